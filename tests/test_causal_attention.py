"""causal_attention (the layer-major prefill's attention: the prompt's queries over its keys,
aligned to the end) against an explicit mask on expanded heads; chunk_bounds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvrecall.client.chunk_attention import causal_attention
from kvrecall.client.hf import chunk_bounds


def reference(query, keys, values, scale, group):
    n, S = query.shape[2], keys.shape[2]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    mask = torch.arange(S, device=query.device)[None, :] <= torch.arange(S - n, S, device=query.device)[:, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


def inputs(n, S, Hq, H, D, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, Hq, n, D, generator=g, device=device).to(dtype)
    k = torch.randn(1, H, S, D, generator=g, device=device).to(dtype)
    v = torch.randn(1, H, S, D, generator=g, device=device).to(dtype)
    return q, k, v


@pytest.mark.parametrize("n,S,Hq,H", [(5, 5, 4, 2), (7, 30, 4, 2), (16, 100, 8, 8), (1, 9, 6, 2), (33, 64, 4, 1)])
def test_matches_an_explicit_end_aligned_mask(n, S, Hq, H):
    q, k, v = inputs(n, S, Hq, H, 16, torch.float32, "cpu", n * S)
    got = causal_attention(q, k, v, 0.25, Hq // H)
    assert torch.allclose(got, reference(q, k, v, 0.25, Hq // H), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n,S", [(256, 256), (256, 1024), (1000, 5000), (2048, 20000)])
def test_matches_on_the_gpu_in_bf16(n, S):
    q, k, v = inputs(n, S, 32, 8, 128, torch.bfloat16, "cuda", n + S)
    got = causal_attention(q, k, v, 128**-0.5, 4)
    want = reference(q.float(), k.float(), v.float(), 128**-0.5, 4)
    assert float((got.float() - want).abs().max()) < 2e-2


def test_chunk_bounds_cover_the_prompt_in_order():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, 4) == [(0, 3)]
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
