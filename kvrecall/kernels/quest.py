"""Quest page bounds and page upper-bound scores (Quest, arXiv 2406.10774).

Kernel: `quest_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    check_int,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


def quest_page_bounds(
    keys: torch.Tensor, page_size: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest page bounds: keys [B, T, D] -> (kmin, kmax) [B, ceil(T / page_size), D] in keys' dtype."""
    check_tensor("keys", keys, rank=3, dtypes=FLOAT_DTYPES)
    check_int("page_size", page_size, 1)
    if use_triton(impl, keys.device):
        from kvrecall.kernels.quest_triton import quest_page_bounds_triton

        return quest_page_bounds_triton(keys, page_size)
    return reference.quest_page_bounds(keys, page_size)


def quest_page_scores(
    query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, valid: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """Quest upper bounds: query [B, G, D], kmin/kmax [B, P, D], valid [B, P] bool -> [B, P] f32.

    max over g of sum_d max(q_d * kmin_d, q_d * kmax_d); invalid pages -inf. Needs kmin <= kmax.
    """
    check_tensor("query", query, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("kmin", kmin, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("kmax", kmax, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    check_size("kmin", kmin, 0, query.shape[0], "B of query")
    check_size("kmin", kmin, 2, query.shape[2], "D of query")
    if kmax.shape != kmin.shape:
        raise ValueError(f"kmax: shape {tuple(kmax.shape)} differs from kmin's {tuple(kmin.shape)}")
    if valid.shape != kmin.shape[:2]:
        raise ValueError(
            f"valid: shape {tuple(valid.shape)}, expected {tuple(kmin.shape[:2])} (B, P of kmin)"
        )
    check_int("query.shape[1]", query.shape[1], 1)
    if use_triton(impl, check_same_device(query=query, kmin=kmin, kmax=kmax, valid=valid)):
        from kvrecall.kernels.quest_triton import quest_page_scores_triton

        return quest_page_scores_triton(query, kmin, kmax, valid)
    return reference.quest_page_scores(query, kmin, kmax, valid)
