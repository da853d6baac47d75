"""windowkv on the GPU path: a CUDA daemon (Triton window scores), a worker mapping by CUDA IPC."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from kvrecall.server.policies.windowkv import select_windows

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(
    num_layers=16, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=2048
)


@pytest.fixture(scope="module")
def gpu_daemon():
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0") as d:
        yield d


@pytest.mark.parametrize("mode", ["mean", "topmean"])
def test_gpu_selection_matches_the_cpu_reference(mode):
    torch.manual_seed(1)
    mass = torch.rand(8, 4093)
    on_gpu = select_windows(mass.cuda(), 491, 8, mode).cpu()
    assert torch.equal(on_gpu, select_windows(mass, 491, 8, mode))


@pytest.mark.parametrize(
    "config",
    [
        {"budget": 256},
        {"budget_fraction": 0.12, "decay": True},
        {"budget": 256, "keep_pruned_in_host": True, "task": "TASK_TYPE_AGGREGATION"},
    ],
)
def test_cuda_ipc_session(gpu_daemon, config):
    torch.manual_seed(0)
    total, prompt = 1500, 1200
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, total, SPEC.head_dim, device="cuda").to(
        torch.bfloat16
    )
    with KVRecallClient(gpu_daemon.target, "gpu-worker") as client:
        with client.open_session(SPEC, "windowkv", config, device="cuda:0") as session:
            queries = torch.randn(
                SPEC.num_layers, SPEC.num_query_heads, 32, SPEC.head_dim, device="cuda"
            ).bfloat16()
            session.ingest(
                kv[:, :, :, :prompt].contiguous(), queries[:, :, -session.observation :].contiguous()
            )
            pos = session.slot_pos.cpu()
            assert torch.equal(pos[0], pos[7]) and torch.equal(pos[8], pos[15])  # two groups of 8
            for position in range(prompt, total):
                session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                session.advance()
                if position % 50 == 0:
                    session.query.copy_(torch.randn_like(session.query))
                    torch.cuda.synchronize()
                    session.boundary()
            session.flush()
            torch.cuda.synchronize()
            pos = session.slot_pos.cpu()
            for layer in range(SPEC.num_layers):
                for head in range(SPEC.num_kv_heads):
                    slots = (pos[layer, head] >= 0).nonzero().flatten()
                    positions = pos[layer, head, slots].long().cuda()
                    assert torch.equal(session.keys[layer, head, slots.cuda()], kv[layer, 0, head, positions])
                    assert torch.equal(
                        session.values[layer, head, slots.cuda()], kv[layer, 1, head, positions]
                    )
            assert session.stats().tokens == total
        pools = {p.tier: p for p in client.stats().pools}
        assert pools["device"].used_bytes == 0 and pools["host"].used_bytes == 0
