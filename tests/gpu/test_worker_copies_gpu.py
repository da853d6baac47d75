"""Worker copies on a GPU (the daemon's worker_copy_share, placement_staged.py): background
retrievals leave their new rows in each session's staging area and the worker copies them into
their slots. An engine decoding louiskv sessions with forced boundaries at lag 2 produces the
same tokens and logits with the daemon copying (share 0) as with the worker copying (share 1),
and with the worker copying its answers did stage rows."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.local import LocalDaemon
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.gpu import NO_WARMUP
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu
STEPS = 48


def decode(share: float, model) -> tuple[list[list[int]], torch.Tensor, list[float], bool]:
    env = {"KVRECALL_WORKER_COPY_SHARE": str(share), "KVRECALL_HOST_READS": "copy"}
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP, env=env) as daemon:
        with KVRecallClient(daemon.target, "worker-copies") as client:
            weights = DecoderWeights.from_hf(model)
            # Every slot crosses every 7th step (a lag of 2 reads the shadow meanwhile).
            engine = Engine(weights, batch=3, max_capacity=2048, lag=2, keep_logits=True,
                            force_boundary=lambda step, slot: step % 7 == slot)  # fmt: skip
            spec = spec_for(model, max_tokens=1024)
            g = torch.Generator().manual_seed(5)
            sessions, slots, logits = [], [], []
            for length in (700, 513, 901):
                session = client.open_session(spec, "louiskv", {"budget": 64, "window": 32, "ingest_select": "units"},
                                              device="cuda", deferred_eviction=True)  # fmt: skip
                assert session.transport == pb.TRANSPORT_CUDA_IPC
                sessions.append(session)
                slots.append(engine.add(session, torch.randint(0, 128, (length,), generator=g).cuda()))
            staged_area = all(session.core.staging is not None for session in sessions)
            for _ in range(STEPS):
                engine.step()
                logits.append(engine.logits.clone())
            seqs = [engine.remove(slot) for slot in slots]
            staged = list(engine.times.staged_rows)
            engine.close()
            for session in sessions:
                session.close()
    return [seq.tokens for seq in seqs], torch.stack(logits, dim=1), staged, staged_area


def test_worker_copies_decode_as_the_daemons_copies(tiny_llama):  # noqa: F811
    tokens, logits, staged, area = decode(0.0, tiny_llama)
    assert not area and not any(staged), "share 0: no staging area, nothing staged"
    copied_tokens, copied_logits, copied_staged, copied_area = decode(1.0, tiny_llama)
    assert copied_area, "share 1: every session maps a staging area"
    assert sum(copied_staged) > 0, "the worker copied no row: the test tells nothing"
    assert copied_tokens == tokens
    assert (copied_logits - logits).abs().max().item() < 1e-5
