"""Exact attention of a chunk's queries over the host tier, block by block, in the form that
merges with other parts of the same softmax (an output and its log-sum-exp).

A question that arrives after a cached document (a chat turn, a chunk) attends over every
earlier token this way: the daemon streams the host tier's K/V through `attend_blocks` in
blocks of tokens (online softmax: one block's scores at a time) and the worker merges the
result with the chunk's causal attention over itself (`merge_attention`). Reference only
(PyTorch; no Triton kernel): `reference.attention_with_lse` is its ground truth.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvrecall.kernels._checks import FLOAT_DTYPES, check_tensor

# Scores one block may hold ([Hq, n, tokens] float32 elements): bounds the daemon's temporaries.
BLOCK_SCORES = 1 << 24


def block_tokens(num_query_heads: int, num_queries: int, limit: int = BLOCK_SCORES) -> int:
    """Host tokens per block so that one block's scores stay within `limit` elements."""
    return max(16, limit // max(1, num_query_heads * num_queries))


def attend_blocks(
    query: torch.Tensor, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [Hq, n, D]; blocks yield (keys, values) [H, b, D] in any float dtype (Hq a
    multiple of H; query head h reads kv head h // (Hq / H)); every query attends over every
    block's tokens. -> (out [Hq, n, D] f32, lse [Hq, n] f32): lse = log(sum exp(scale * q.k))
    over all tokens; with no token at all, out is 0 and lse is -inf (it merges as nothing)."""
    check_tensor("query", query, rank=3, dtypes=FLOAT_DTYPES)
    Hq, n, D = query.shape
    q = query.float() * scale
    m = lse_sum = acc = None
    H = group = 0
    for keys, values in blocks:
        if acc is None:
            H = keys.shape[0]
            if H == 0 or Hq % H or keys.shape[2] != D:
                raise ValueError(f"keys: shape {tuple(keys.shape)} does not fit query {tuple(query.shape)}")
            group = Hq // H
            q = q.reshape(H, group * n, D)  # query heads h*group .. (h+1)*group - 1 read kv head h
            m = q.new_full((H, group * n), float("-inf"))
            lse_sum = q.new_zeros((H, group * n))
            acc = q.new_zeros((H, group * n, D))
        if keys.shape[1] == 0:
            continue
        scores = torch.bmm(q, keys.float().transpose(1, 2))  # [H, group * n, b]
        new_m = torch.maximum(m, scores.amax(dim=-1))
        p = torch.exp(scores - new_m[..., None])
        alpha = torch.exp(m - new_m)  # exp(-inf) = 0 before the first block
        lse_sum = lse_sum * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.bmm(p, values.float())
        m = new_m
    if acc is None or not torch.isfinite(m).all():
        return query.new_zeros((Hq, n, D), dtype=torch.float32), query.new_full((Hq, n), float("-inf"), dtype=torch.float32)
    out = (acc / lse_sum[..., None]).reshape(Hq, n, D)
    return out, (m + torch.log(lse_sum)).reshape(Hq, n)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """The attention over the union of two disjoint token sets from each set's normalised
    output [..., D] and log-sum-exp [...] (a part with lse -inf contributes nothing). -> f32."""
    lse = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse), torch.exp(lse_b - lse)
    total = wa + wb
    return (out_a.float() * (wa / total)[..., None]) + (out_b.float() * (wb / total)[..., None])


def causal_attention_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's causal attention over itself: query [Hq, n, D], keys / values [H, n, D];
    query i attends over tokens [0, i]. -> (out [Hq, n, D] f32, lse [Hq, n] f32)."""
    Hq, n, D = query.shape
    H = keys.shape[0]
    group = Hq // H
    q = query.float().reshape(H, group, n, D) * scale
    scores = torch.einsum("hgnd,hmd->hgnm", q, keys.float())
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, group, n]
    out = torch.einsum("hgnm,hmd->hgnd", torch.exp(scores - lse[..., None]), values.float())
    return out.reshape(Hq, n, D), lse.reshape(Hq, n)
