"""KVRECALL_KERNEL_PROFILE_OUT on a CUDA daemon: the kernels of a retrieval are listed with their
launches, and the GPU time the daemon held is no more than the kernels' total."""

from __future__ import annotations

import json

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP
from tests.integration.test_sessions import decode_steps

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=2000)


def test_a_cuda_daemon_writes_its_retrieval_kernels(tmp_path):
    path = tmp_path / "kernels.json"
    prompt, decoded = 1500, 40
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, prompt + decoded, SPEC.head_dim, generator=g)
    kv = kv.to(torch.bfloat16).cuda()
    with LocalDaemon(
        host_pool_gb=0.5, device_pool_gb=0.5, device="cuda:0", extra_args=list(NO_WARMUP),
        env={"KVRECALL_KERNEL_PROFILE_OUT": str(path), "KVRECALL_KERNEL_PROFILE_S": "60"},
    ) as d:  # fmt: skip
        with KVRecallClient(d.target, "gpu-kernel-profile") as client:
            with client.open_session(SPEC, "louiskv", {"budget": 128}, device="cuda:0") as session:
                queries = torch.randn(SPEC.num_layers, SPEC.num_query_heads, 16, SPEC.head_dim, generator=g)
                session.ingest(kv[:, :, :, :prompt].contiguous(), queries[:, :, -max(1, session.observation) :].to(kv))
                decode_steps(session, kv, prompt, decoded)
                session.flush()
                session.query.copy_(torch.randn(session.query.shape, generator=g).to(session.query))
                assert session.boundary().tokens_placed > 0
    profile = json.loads(path.read_text())  # the window (3 s) outlived the daemon: written at shutdown
    names = {row["name"] for row in profile["kernels"]}
    assert "_place_kernel" in names, sorted(names)  # the retrieval's placement
    assert not any(name.startswith("Memcpy") for name in names)  # copies are listed apart
    assert profile["launches"] >= len(profile["kernels"]) > 0
    assert 0 < profile["busy_ms"] <= profile["kernel_ms"] + 2e-3  # both rounded to 1 us
