"""A call cancelled mid-operation (deadline, dead client) must not let anything free memory
the operation's worker thread is still using: the daemon once segfaulted when a CloseSession
(or its shutdown) unmapped a session, or an ingest's staging segment, under a running thread."""

from __future__ import annotations

import grpc
import torch

from kvrecall.client import ModelSpec
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import open_request

TOKENS = 4000  # a louiskv ingest of this many tokens (k-means) takes far longer than the deadline
SPEC = ModelSpec(2, 2, 4, 16, torch.float32, TOKENS + 64)


def test_deadline_exceeded_ingest_then_close_keeps_the_daemon_alive(rdaemon, raw):
    baseline = raw.pools()
    kv = torch.randn(2, 2, 2, TOKENS, 16)
    staging = ShmSegment.create(shm_name("stage"), kv.numel() * 4)
    staging.tensor.view(torch.float32).copy_(kv.view(-1))
    try:
        for _ in range(2):
            config = {"budget": 64, "n_sink": 4, "window": 32, "cluster_size": 8}
            session_id = raw.ok("OpenSession", open_request(SPEC, "louiskv", config)).session_id
            request = pb.IngestPromptRequest(session_id=session_id, num_tokens=TOKENS)
            request.kv.CopyFrom(pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=list(kv.shape),
                                             shm=pb.ShmRef(name=staging.name)))
            answer = raw.call("IngestPrompt", request, timeout=0.02)
            assert answer.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK), answer.details
            # at once: the close waits for the still-running ingest instead of freeing under it
            raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id))
    finally:
        staging.release()
    assert rdaemon.process.poll() is None, rdaemon.log()[-3000:]
    assert raw.health() == "SERVING"
    assert raw.pools() == baseline
