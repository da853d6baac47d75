"""Greedy selection under a token budget (LouisKV's units, Quest's pages).

Kernel: `budget_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


def select_under_budget(
    scores: torch.Tensor, sizes: torch.Tensor, budget: int, impl: str = "auto"
) -> torch.Tensor:
    """Greedy take under a token budget: scores [B, U] float, sizes [B, U] int -> take [B, U] int64.

    Descending score (ties: lower index first), each unit takes min(size, budget left);
    -inf / NaN scores take nothing. Kernel: U <= budget_triton.MAX_UNITS, else the reference.
    """
    check_tensor("scores", scores, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("sizes", sizes, rank=2, dtypes=INDEX_DTYPES)
    if sizes.shape != scores.shape:
        raise ValueError(f"sizes: shape {tuple(sizes.shape)} differs from scores' {tuple(scores.shape)}")
    check_int("budget", budget, 0)
    if use_triton(impl, check_same_device(scores=scores, sizes=sizes)):
        from kvrecall.kernels.budget_triton import select_under_budget_triton

        return select_under_budget_triton(scores, sizes, budget)
    return reference.select_under_budget(scores, sizes, budget)
