"""host_attention: a chunk's exact attention over the host tier, block by block, equals one
softmax over every token, and merged with the chunk's causal attention over itself equals
causal attention over document + chunk."""

from __future__ import annotations

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels import reference
from kvrecall.kernels.host_attention import block_tokens


def blocks_of(keys: torch.Tensor, values: torch.Tensor, size: int):
    for start in range(0, keys.shape[1], size):
        yield keys[:, start : start + size], values[:, start : start + size]


def plain(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """Per query head and query, softmax over every token in float64."""
    group = query.shape[0] // keys.shape[0]
    out = torch.empty(query.shape, dtype=torch.float64)
    lse = torch.empty(query.shape[:2], dtype=torch.float64)
    for head in range(query.shape[0]):
        scores = query[head].double() @ keys[head // group].double().T * scale  # [n, T]
        lse[head] = torch.logsumexp(scores, dim=-1)
        out[head] = torch.softmax(scores, dim=-1) @ values[head // group].double()
    return out, lse


@pytest.mark.parametrize(
    "Hq,H,n,T,D,block",
    [(4, 4, 1, 7, 8, 3), (9, 3, 5, 100, 64, 16), (8, 2, 33, 1000, 32, 128), (32, 8, 3, 257, 128, 256)],
)
def test_blocks_equal_one_softmax(Hq, H, n, T, D, block) -> None:
    g = torch.Generator().manual_seed(Hq * 1000 + T)
    query = torch.randn(Hq, n, D, generator=g)
    keys, values = torch.randn(H, T, D, generator=g) * 2, torch.randn(H, T, D, generator=g)
    scale = D**-0.5
    out, lse = K.attend_blocks(query, blocks_of(keys, values, block), scale)
    want_out, want_lse = plain(query, keys, values, scale)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    ref_out, ref_lse = reference.attention_with_lse(query, keys, values, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_keys_are_read_in_float32(dtype) -> None:
    g = torch.Generator().manual_seed(7)
    query = torch.randn(6, 4, 16, generator=g)
    keys, values = torch.randn(2, 50, 16, generator=g).to(dtype), torch.randn(2, 50, 16, generator=g).to(dtype)
    out, lse = K.attend_blocks(query, blocks_of(keys, values, 9), 0.25)
    want_out, want_lse = plain(query, keys.float(), values.float(), 0.25)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_no_tokens_merges_as_nothing() -> None:
    query = torch.randn(4, 3, 8)
    out, lse = K.attend_blocks(query, iter(()), 0.5)
    assert torch.equal(out, torch.zeros(4, 3, 8)) and torch.isinf(lse).all() and (lse < 0).all()
    keys, values = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    own_out, own_lse = K.causal_attention_lse(query, keys, values, 0.5)
    torch.testing.assert_close(K.merge_attention(out, lse, own_out, own_lse), own_out)


@pytest.mark.parametrize("Hq,H,n,T,D", [(4, 2, 1, 10, 8), (9, 3, 17, 300, 64), (8, 8, 40, 64, 16)])
def test_host_part_merged_with_the_chunk_equals_causal_attention_over_both(Hq, H, n, T, D) -> None:
    g = torch.Generator().manual_seed(n * 31 + T)
    query = torch.randn(Hq, n, D, generator=g)
    keys, values = torch.randn(H, T + n, D, generator=g), torch.randn(H, T + n, D, generator=g)
    scale = D**-0.5
    host_out, host_lse = K.attend_blocks(query, blocks_of(keys[:, :T], values[:, :T], 37), scale)
    own_out, own_lse = K.causal_attention_lse(query, keys[:, T:], values[:, T:], scale)
    merged = K.merge_attention(host_out, host_lse, own_out, own_lse)
    group = Hq // H
    want = torch.nn.functional.scaled_dot_product_attention(
        query[None].double(), keys[None].double().repeat_interleave(group, 1),
        values[None].double().repeat_interleave(group, 1),
        attn_mask=torch.ones(n, T + n, dtype=torch.bool).tril(T), scale=scale,
    )[0]  # fmt: skip
    torch.testing.assert_close(merged.double(), want, atol=1e-5, rtol=1e-5)


def test_block_tokens_bounds_the_scores() -> None:
    assert block_tokens(32, 100, limit=1 << 20) == (1 << 20) // 3200
    assert block_tokens(32, 4096, limit=1 << 10) == 16  # at least 16 tokens a block
