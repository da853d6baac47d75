"""Causal attention of a prompt's queries over its keys, aligned to the end: query i of n
attends over keys [0, S - n + i] (GQA unexpanded).

The layer-major prefill (client/hf.py) calls it with n == S: one SDPA call with is_causal,
the very call of transformers' one-pass prefill (cuDNN's fused attention on Hopper), so the
prefill's attention costs what full KV's does. n < S takes SDPA with an end-aligned mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """query [1, Hq, n, D], the last n of keys / values [1, H, S, D] (Hq = group * H) ->
    [1, Hq, n, D]: query i attends over keys [0, S - n + i]."""
    n, S = query.shape[2], keys.shape[2]
    if n == S:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=group > 1)
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=causal_lower_right(n, S), scale=scale, enable_gqa=group > 1
    )
