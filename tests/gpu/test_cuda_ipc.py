"""The zero-copy GPU path: a daemon on CUDA, a worker mapping its working set by CUDA IPC."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(num_layers=4, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=2048)


@pytest.fixture(scope="module")
def gpu_daemon():
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP) as d:
        yield d


def check_contents(session, kv: torch.Tensor) -> int:
    """Every resident slot holds the K/V of its token; returns the resident count checked."""
    pos = session.slot_pos.cpu()
    checked = 0
    for layer in range(SPEC.num_layers):
        for head in range(SPEC.num_kv_heads):
            slots = (pos[layer, head] >= 0).nonzero().flatten()
            positions = pos[layer, head, slots].long()
            assert torch.equal(session.keys[layer, head, slots.cuda()], kv[layer, 0, head, positions.cuda()])
            assert torch.equal(session.values[layer, head, slots.cuda()], kv[layer, 1, head, positions.cuda()])
            checked += len(slots)
    return checked


@pytest.mark.parametrize("policy", ["full", "louiskv", "quest", "snapkv", "streaming", "louiskv-pinned"])
def test_cuda_ipc_session(gpu_daemon, policy):
    torch.manual_seed(0)
    total, prompt = 1500, 1200
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, total, SPEC.head_dim, device="cuda").to(torch.bfloat16)
    config = None if policy == "full" else ({"window": 64} if policy == "streaming" else {"budget": 256})
    if policy == "louiskv-pinned":  # a quarter of the budget keeps the ingest selection's best tokens
        policy, config = "louiskv", {"budget": 256, "pin_ingest": 0.25}
    with KVRecallClient(gpu_daemon.target, "gpu-worker") as client:
        with client.open_session(SPEC, policy, config, device="cuda:0") as session:
            assert session.keys.is_cuda and session.transport == 2  # TRANSPORT_CUDA_IPC
            queries = torch.randn(SPEC.num_layers, SPEC.num_query_heads, 16, SPEC.head_dim, device="cuda").bfloat16()
            session.ingest(kv[:, :, :, :prompt].contiguous(), queries[:, :, -max(1, session.observation):])
            assert check_contents(session, kv) > 0
            for position in range(prompt, total):
                session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                session.advance()
                if policy in ("louiskv", "quest") and position % 25 == 0:
                    session.query.copy_(torch.randn_like(session.query))
                    torch.cuda.synchronize()
                    result = session.boundary()
                    assert result.bytes_moved == 2 * result.tokens_gathered * SPEC.head_dim * 2
            session.flush()
            torch.cuda.synchronize()
            check_contents(session, kv)
            pos = session.slot_pos.cpu()
            for row in pos.flatten(0, 1):  # no token is resident twice
                held = row[row >= 0]
                assert len(held) == len(held.unique())
            stats = session.stats()
            assert stats.tokens == total
            if policy == "full":
                assert stats.resident_tokens == total
        pools = {p.tier: p for p in client.stats().pools}
        assert pools["device"].used_bytes == 0 and pools["host"].used_bytes == 0
        assert pools["host"].kind == "pinned" and pools["device"].kind == "cuda"
