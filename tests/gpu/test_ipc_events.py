"""Cross-process ordering by CUDA IPC events: the worker publishes without a host sync."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(
    num_layers=4, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=2048
)


@pytest.fixture(scope="module")
def gpu_daemon():
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP) as d:
        yield d


@pytest.mark.parametrize("use_event", [True, False])
def test_a_busy_worker_stream_still_orders_its_query_before_the_daemon_reads_it(gpu_daemon, use_event):
    torch.manual_seed(0)
    prompt = 900
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, prompt, SPEC.head_dim, device="cuda").bfloat16()
    with KVRecallClient(gpu_daemon.target, "event-worker") as client:
        with client.open_session(SPEC, "louiskv", {"budget": 128}, device="cuda:0") as session:
            assert session.core.publish_event is not None  # the daemon sent its event handle
            if not use_event:
                session.core.publish_event = None  # the fallback: a stream sync in publish()
            queries = torch.randn(SPEC.num_layers, SPEC.num_query_heads, 1, SPEC.head_dim, device="cuda")
            session.ingest(kv, queries.bfloat16())
            for _ in range(3):
                query = torch.randn(
                    SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim, device="cuda"
                ).bfloat16()
                torch.cuda.synchronize()
                torch.cuda._sleep(100_000_000)  # the worker's stream is busy (~50 ms) before the write
                session.query.copy_(query)
                first = session.boundary()  # publish: event record (or stream sync), then the RPC
                again = session.boundary()  # the same query: everything is resident already
                assert first.tokens_placed > 0
                assert again.tokens_gathered == 0, "the daemon read the query before the worker wrote it"
