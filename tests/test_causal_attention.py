"""causal_attention (the layer-major prefill's chunk attention: a chunk's queries over the
layer's K/V so far, aligned to the end) against an explicit mask on expanded heads: the one-call
masked path and the split path (earlier keys unmasked + the causal square, merged by
log-sum-exp; flash on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvrecall.client.chunk_attention import (
    attention_lse,
    causal_attention,
    choose_kernel,
    merge,
    reference_lse,
)
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
@pytest.mark.parametrize("split", [False, True])
def test_matches_an_explicit_end_aligned_mask(n, S, Hq, H, split):
    q, k, v = inputs(n, S, Hq, H, 16, torch.float32, "cpu", n * S)
    got = causal_attention(q, k, v, 0.25, Hq // H, split=split)
    assert torch.allclose(got, reference(q, k, v, 0.25, Hq // H), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n,S", [(256, 256), (256, 1024), (1000, 5000), (2048, 20000)])
def test_matches_on_the_gpu_in_bf16(n, S):
    q, k, v = inputs(n, S, 32, 8, 128, torch.bfloat16, "cuda", n + S)
    got = causal_attention(q, k, v, 128**-0.5, 4)
    want = reference(q.float(), k.float(), v.float(), 128**-0.5, 4)
    assert float((got.float() - want).abs().max()) < 2e-2


def test_chunk_bounds_keep_the_prompt_tail_in_one_chunk():
    assert chunk_bounds(10, 4, 1) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, 4, 3) == [(0, 4), (4, 10)]
    assert chunk_bounds(3, 4, 8) == [(0, 3)]
    assert chunk_bounds(8, 4, 4) == [(0, 4), (4, 8)]


def test_the_lse_kernel_is_the_first_that_agrees_with_the_reference():
    def log2_lse(q, k, v, scale, causal):  # a kernel with another convention for the log-sum-exp
        out, lse = reference_lse(q, k, v, scale, causal)
        return out, lse * 1.4426950408889634

    def refuses(q, k, v, scale, causal):
        raise RuntimeError("no kernel for this layout")

    cpu = torch.device("cpu")
    candidates = [("refuses", refuses), ("log2", log2_lse), ("reference", reference_lse), ("last", log2_lse)]
    assert choose_kernel(candidates, cpu, torch.float32, 16)[0] == "reference"
    assert choose_kernel(candidates[:2], cpu, torch.float32, 16)[0] == "log2"  # none agrees: the last


@pytest.mark.parametrize("n,S", [(3, 10), (16, 16 + 40)])
def test_the_two_halves_merge_into_attention_over_all_keys(n, S):
    q, k, v = inputs(n, S, 4, 2, 16, torch.float32, "cpu", n)
    earlier = S - n
    stacked = q.reshape(1, 2, 2 * n, 16)
    out, lse = attention_lse(stacked, k[:, :, :earlier], v[:, :, :earlier], 0.25, causal=False)
    own = attention_lse(q, k[:, :, earlier:].repeat_interleave(2, 1), v[:, :, earlier:].repeat_interleave(2, 1), 0.25, True)
    got = merge((out.reshape(1, 4, n, 16), lse.reshape(1, 4, n)), own)
    assert torch.allclose(got, reference(q, k, v, 0.25, 2), atol=1e-5)
