"""Unit scoring (LouisKV, arXiv 2510.11292): a query scores every unit by its representative key.

Kernel: `unit_scores_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    REP_DTYPES,
    check_choice,
    check_int,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton

AGGREGATIONS = ("max", "sum")


def score_units(
    query: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, agg: str = "max", impl: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Unit scores: query [B, G, D], reps [B, U, D] (any float dtype, float8 e4m3 too), valid
    [B, U] bool -> [B, U] f32.

    max or sum over the G grouped query heads of dot(query, rep); invalid units -inf (LouisKV).
    `out`: a [B, U] float32 tensor (e.g. columns of a wider one, unit stride 1 along U) the scores
    are written into and returned: a table kept in parts scores each into its columns.
    """
    check_tensor("query", query, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("reps", reps, rank=3, dtypes=REP_DTYPES)
    check_tensor("valid", valid, rank=2, dtypes=(torch.bool,))
    check_size("reps", reps, 0, query.shape[0], "B of query")
    check_size("reps", reps, 2, query.shape[2], "D of query")
    check_size("valid", valid, 0, reps.shape[0], "B of reps")
    check_size("valid", valid, 1, reps.shape[1], "U of reps")
    check_int("query.shape[1]", query.shape[1], 1)
    check_choice("agg", agg, AGGREGATIONS)
    if out is not None:
        check_tensor("out", out, rank=2, dtypes=(torch.float32,))
        check_size("out", out, 0, reps.shape[0], "B of reps")
        check_size("out", out, 1, reps.shape[1], "U of reps")
        if out.shape[1] > 1 and out.stride(1) != 1:
            raise ValueError(f"out: stride {out.stride()} along U, expected 1")
    device = check_same_device(query=query, reps=reps, valid=valid, **({} if out is None else {"out": out}))
    if use_triton(impl, device):
        from kvrecall.kernels.unit_scores_triton import score_units_triton

        return score_units_triton(query, reps, valid, agg, out)
    scores = reference.score_units(query, reps, valid, agg)
    return scores if out is None else out.copy_(scores)
