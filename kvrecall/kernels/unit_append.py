"""Append one unit to the unit tables of several sessions at once (LouisKV: an output segment
closes into a unit at a boundary; a Boundaries call closes every crossing session's).

Kernel: `unit_append_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import check_int, check_same_device, check_size, check_tensor
from kvrecall.kernels._triton import use_triton

UnitTable = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def append_units(
    tables: list[UnitTable], reps: torch.Tensor, unit_column: list[int], token_column: list[int],
    starts: list[int], lengths: list[int], impl: str = "auto",
) -> None:  # fmt: skip
    """In place, for each table s (reps [B, U, D], sizes [B, U] int32, valid [B, U] bool,
    position [B, M] int32; every table of the same shapes and dtypes): every row b gets a unit
    in column unit_column[s] with representative reps[s, b] ([S, B, D], the tables' dtype),
    size lengths[s] and valid, and candidates in columns token_column[s] + j, j < lengths[s],
    with position starts[s] + j (that unit's, when token_column[s] follows the candidates of
    the units before it: louiskv's grouped table). Pure copies: the
    kernel (one launch for all tables, each addressed at its offset from the first's) and the
    reference (table by table) write the same bits."""
    if not tables:
        raise ValueError("tables: at least one is required")
    names = ("reps", "sizes", "valid", "position")
    dtypes = (None, (torch.int32,), (torch.bool,), (torch.int32,))
    for i, table in enumerate(tables):
        for name, tensor, like, allowed in zip(names, table, tables[0], dtypes, strict=True):
            check_tensor(f"tables[{i}].{name}", tensor, rank=3 if name == "reps" else 2, dtypes=allowed)
            if tensor.shape != like.shape or tensor.dtype != like.dtype or not tensor.is_contiguous():
                raise ValueError(f"tables[{i}].{name}: {tuple(tensor.shape)} {tensor.dtype} must be contiguous and "
                                 f"like tables[0]'s {tuple(like.shape)} {like.dtype}")  # fmt: skip
    rows, units, dim = tables[0][0].shape
    check_tensor("reps", reps, rank=3, dtypes=(tables[0][0].dtype,))
    check_size("reps", reps, 0, len(tables), "S, the tables")
    check_size("reps", reps, 1, rows, "B of the tables")
    check_size("reps", reps, 2, dim, "D of the tables")
    for name, values in (("unit_column", unit_column), ("token_column", token_column), ("starts", starts),
                         ("lengths", lengths)):  # fmt: skip
        if len(values) != len(tables):
            raise ValueError(f"{name}: {len(values)} entries for {len(tables)} tables")
    tokens = tables[0][3].shape[1]
    for i in range(len(tables)):
        check_int(f"starts[{i}]", starts[i], 0)
        check_int(f"lengths[{i}]", lengths[i], 1)
        if not 0 <= unit_column[i] < units:
            raise ValueError(f"unit_column[{i}]: {unit_column[i]} is outside the {units} units")
        if token_column[i] < 0 or token_column[i] + lengths[i] > tokens:
            raise ValueError(f"token_column[{i}]: {lengths[i]} candidates from {token_column[i]} pass the {tokens} columns")
    device = check_same_device(reps=reps, **{f"tables_{i}": t[0] for i, t in enumerate(tables)})
    if use_triton(impl, device):
        from kvrecall.kernels.unit_append_triton import append_units_triton

        if append_units_triton(tables, reps, unit_column, token_column, starts, lengths):
            return
    reference.append_units(tables, reps, unit_column, token_column, starts, lengths)
