"""Decode attention over a working set and its ground truth (reference only: exactness tests).

Reference only: no Triton kernel.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import IMPLS


def _check_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    check_tensor("query", query, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("keys", keys, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("values", values, rank=3, dtypes=FLOAT_DTYPES)
    if values.shape != keys.shape:
        raise ValueError(f"values: shape {tuple(values.shape)} differs from keys' {tuple(keys.shape)}")
    check_size("query", query, 1, keys.shape[2], "D of keys")
    if keys.shape[0] == 0 or query.shape[0] % keys.shape[0]:
        raise ValueError(f"query: {query.shape[0]} heads is not a multiple of the {keys.shape[0]} kv heads")


def _reference_only(impl: str, op: str) -> None:
    check_choice("impl", impl, IMPLS)
    if impl == "triton":
        raise ValueError(f"impl: {op} has no Triton kernel; use 'auto' or 'reference'")


def masked_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """GQA decode attention over valid slots -> [Hq, D] f32 (reference only).

    query [Hq, D], keys/values [Hkv, C, D], valid [Hkv, C] bool; query head h reads kv head
    h // (Hq / Hkv); a head with no valid slot outputs zeros.
    """
    _check_attention(query, keys, values)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    if valid.shape != keys.shape[:2]:
        raise ValueError(
            f"valid: shape {tuple(valid.shape)}, expected {tuple(keys.shape[:2])} (Hkv, C of keys)"
        )
    check_same_device(query=query, keys=keys, values=values, valid=valid)
    _reference_only(impl, "masked_attention")
    return reference.masked_attention(query, keys, values, valid, scale)


def attention_at_positions(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Full attention restricted to `positions` -> [Hq, D] f32: the ground truth for a working set.

    keys/values [Hkv, T, D] hold every token, positions [Hkv, R] int (-1 = none). Attention
    over a working set (masked_attention with valid = slot_pos >= 0) must equal this with
    positions = slot_pos, whatever the slot order (reference only).
    """
    _check_attention(query, keys, values)
    check_tensor("positions", positions, rank=2, dtypes=INDEX_DTYPES)
    check_size("positions", positions, 0, keys.shape[0], "Hkv of keys")
    if positions.numel() and int(positions.max()) >= keys.shape[1]:
        raise ValueError(f"positions: max {int(positions.max())} is past the {keys.shape[1]} tokens of keys")
    check_same_device(query=query, keys=keys, values=values, positions=positions)
    _reference_only(impl, "attention_at_positions")
    return reference.attention_at_positions(query, keys, values, positions, scale)
