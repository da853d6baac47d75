"""A chunk's exact attention over the host tier on a CUDA daemon (pinned host pages read by the
gather kernel, CUDA IPC working set): equal to one softmax over every earlier token, with
blocks small enough that several are merged."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.kernels import reference
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP
from tests.integration.test_sessions import decode_steps

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(num_layers=3, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=3000)


@pytest.mark.parametrize("policy", ["louiskv", "quest"])
def test_attend_on_cuda_equals_one_softmax(policy):
    prompt, decoded = 2500, 40
    g = torch.Generator().manual_seed(9)
    kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, prompt + decoded, SPEC.head_dim, generator=g)
    kv = kv.to(torch.bfloat16).cuda()
    with LocalDaemon(
        host_pool_gb=0.5, device_pool_gb=0.5, device="cuda:0", extra_args=["--page-kb", "64", *NO_WARMUP]
    ) as d:
        with KVRecallClient(d.target, "gpu-exact-chunks") as client:
            with client.open_session(SPEC, policy, {"budget": 128}, device="cuda:0") as session:
                queries = torch.randn(SPEC.num_layers, SPEC.num_query_heads, 16, SPEC.head_dim, generator=g)
                session.ingest(kv[:, :, :, :prompt].contiguous(), queries[:, :, -max(1, session.observation) :].to(kv))
                decode_steps(session, kv, prompt, decoded)
                session.flush()
                for layer in range(SPEC.num_layers):
                    chunk = torch.randn(SPEC.num_query_heads, 1000, SPEC.head_dim, generator=g).cuda()  # 2 blocks
                    out, lse = session.attend(layer, chunk, 0.125, retrieve=chunk[:, -4:])
                    want_out, want_lse = reference.attention_with_lse(
                        chunk, kv[layer, 0].float(), kv[layer, 1].float(), 0.125
                    )
                    assert out.is_cuda
                    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
                    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
