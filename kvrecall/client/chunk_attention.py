"""A chunk's causal attention over a layer's K/V so far, aligned to the end (the layer-major
prefill: chunk [a, a + n) of the prompt attends over keys [0, a + n)).

One SDPA call with an end-aligned causal mask is exact, but a mask keeps it off the flash
kernel (on a GPU it runs the slower memory-efficient kernel, GQA expanded). So on a GPU the
chunk is split where the mask is trivial:

* over the earlier tokens [0, a): no mask at all, so the query heads of one KV head are
  stacked as one longer query (GQA without expanding the keys) and flash runs unmasked;
* over itself [a, a + n): a square causal block, flash with is_causal (the chunk's K/V
  expanded to the query heads: one chunk's worth, not the layer's);

and the two halves merge by their log-sum-exps (softmax over the union of the keys). Every
query sees exactly the keys the mask gives it, so the result is full attention's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def attention_lse(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [1, H, m, D] over keys / values [1, H, S, D] (as many heads; causal: m == S) ->
    (out [1, H, m, D] in query's dtype, log-sum-exp of the scaled scores [1, H, m] f32).
    Flash on a GPU for 16-bit inputs, else scores in f32 (the reference)."""
    if query.is_cuda and query.dtype in FLASH_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, keys, values, 0.0, causal, False, scale=scale
        )[:2]
        return out, lse
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale
    if causal:
        m = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ values.float()
    return out.to(query.dtype), lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Attention outputs over disjoint key sets, with their log-sum-exps -> attention over the union."""
    total = parts[0][1]
    for _, lse in parts[1:]:
        total = torch.logaddexp(total, lse)
    out = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in parts)
    return out.to(dtype)


def split_causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, group: int
) -> torch.Tensor:
    """causal_attention (n < S) as the unmasked earlier part and the causal square, merged."""
    _, Hq, n, D = query.shape
    H, earlier = keys.shape[1], keys.shape[2] - n
    stacked = query.reshape(1, H, group * n, D)  # query head h * group + g uses KV head h
    out, lse = attention_lse(stacked, keys[:, :, :earlier], values[:, :, :earlier], scale, causal=False)
    before = (out.reshape(1, Hq, n, D), lse.reshape(1, Hq, n))
    own_k, own_v = keys[:, :, earlier:], values[:, :, earlier:]
    if group > 1:
        own_k, own_v = own_k.repeat_interleave(group, dim=1), own_v.repeat_interleave(group, dim=1)
    own = attention_lse(query, own_k, own_v, scale, causal=True)
    return merge([before, own], query.dtype)


def causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, group: int,
    split: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """query [1, Hq, n, D], the last n of keys / values [1, H, S, D]: query i attends over keys
    [0, S - n + i] (causal, aligned to the end). split (default: on a GPU with 16-bit inputs)
    takes the flash path above; otherwise one SDPA call with the end-aligned mask, GQA unexpanded."""
    n, S = query.shape[2], keys.shape[2]
    if n == S:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=group > 1)
    if split is None:
        split = query.is_cuda and query.dtype in FLASH_DTYPES
    if split:
        return split_causal_attention(query, keys, values, scale, group)
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=causal_lower_right(n, S), scale=scale, enable_gqa=group > 1
    )
