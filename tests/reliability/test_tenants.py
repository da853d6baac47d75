"""Tenants on one daemon with default settings: fair shares of the pools, stats that show a
worker its own sessions only, sessions reachable only with their capability."""

from __future__ import annotations

import grpc
import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec, NotFoundError, ResourceExhaustedError
from kvrecall.local import LocalDaemon
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import Raw, random_kv

C = grpc.StatusCode
# ~4 MiB of host pages and a ~1 MiB working set per session: a 32 MiB host pool holds 8 of them.
SPEC = ModelSpec(num_layers=4, num_kv_heads=4, num_query_heads=4, head_dim=64, dtype=torch.float32, max_tokens=512)


@pytest.fixture(scope="module")
def shared_daemon():
    """Default worker_share (half of each pool), a small host pool."""
    with LocalDaemon(host_pool_gb=1 / 32, device_pool_gb=1 / 16, extra_args=["--page-kb", "256"], worker_share=None) as d:
        yield d


def test_one_worker_cannot_take_the_whole_pool(shared_daemon):
    with KVRecallClient(shared_daemon.target, "greedy") as greedy, KVRecallClient(shared_daemon.target, "late") as late:
        held = []
        try:
            with pytest.raises(ResourceExhaustedError) as info:
                for _ in range(64):  # more than the whole pool could hold
                    held.append(greedy.open_session(SPEC, "full"))
            message = info.value.details
            assert "host pool" in message and "'greedy'" in message and "worker_share=0.5" in message, message
            assert "quota" in message and "free" in message, message
            stats = greedy.stats()
            host = next(p for p in stats.pools if p.tier == "host")
            assert sum(s.host_bytes for s in stats.sessions) <= host.capacity_bytes // 2
            assert host.free_bytes >= host.capacity_bytes // 2 - 4 * (256 << 10)  # about half is left
            # a worker that arrives after the greedy one filled its share still gets sessions
            with late.open_session(SPEC, "full") as session:
                kv = random_kv(SPEC, 100, seed=1)
                session.ingest(kv)
                assert session.stats().tokens == 100
        finally:
            for session in held:
                session.close()


def test_stats_show_a_worker_its_own_sessions_and_an_operator_all(shared_daemon):
    with (
        KVRecallClient(shared_daemon.target, "tenant-a") as a,
        KVRecallClient(shared_daemon.target, "tenant-b") as b,
        KVRecallClient(shared_daemon.target, "") as operator,
    ):
        with a.open_session(SPEC, "full", tag="a") as sa, b.open_session(SPEC, "full", tag="b") as sb:
            assert {s.session_id for s in a.stats().sessions} == {sa.session_id}
            assert {w.worker_id for w in a.stats().workers} == {"tenant-a"}
            assert {s.session_id for s in b.stats().sessions} == {sb.session_id}
            assert {sa.session_id, sb.session_id} <= {s.session_id for s in operator.stats().sessions}
            # one session's stats need its capability, whoever asks
            with pytest.raises(NotFoundError):
                b.stats(sa.session_id, sb.capability)
            with pytest.raises(NotFoundError):
                operator.stats(sa.session_id)
            assert operator.stats(sa.session_id, sa.capability).sessions[0].tag == "a"


def test_without_its_capability_a_session_is_not_there(shared_daemon):
    """The catalogue's failure: a caller that names no worker decoding against (or ingesting
    into) another worker's session. Now NOT_FOUND, and the session is untouched."""
    raw = Raw(shared_daemon.target, worker="victim")
    opened = raw.ok("OpenSession", pb.OpenSessionRequest(
        worker_id="victim", layout=SPEC.to_proto(), policy=pb.PolicyConfig(name="full"), transport=pb.TRANSPORT_INLINE))
    session_id = opened.session_id
    assert len(opened.capability) >= 40  # 32 random bytes, url-safe base64
    try:
        kv = pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=[4, 2, 4, 8, 64], inline_data=bytes(4 * 2 * 4 * 8 * 64 * 4))
        for worker in ("", "victim", "intruder"):
            answer = raw.call("IngestPrompt", pb.IngestPromptRequest(session_id=session_id, kv=kv, num_tokens=8),
                              worker=worker, fill=False)
            assert answer.code == C.NOT_FOUND, answer.details
            request = pb.DecodeRequest(seq=1, session_id=session_id)
            request.boundary.position = 8
            _, answer = raw.stream([request], worker=worker, fill=False)
            assert answer.code == C.NOT_FOUND, answer.details
        stats = raw.ok("GetStats", pb.StatsRequest(session_id=session_id))
        assert stats.sessions[0].prompt_tokens == 0 and stats.sessions[0].boundaries == 0
    finally:
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id))
        raw.close()
