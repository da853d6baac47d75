"""Rows into their slots: a staged placement's moved K / V rows (one buffer) written into a
working set's rows named by target (placement_staged.copy_staged; the worker's apply_staged).

Kernel: `scatter_rows_triton.py` (16-byte loads and stores, a tile of rows a program, K and V
in one launch); reference: two `index_copy_` (scatter_rows_reference here), which on an H200
moved a retrieval's rows slower than the kernel (scripts/scatter_rows_probe.py).
"""

from __future__ import annotations

import torch

from kvrecall.kernels._triton import use_triton


def scatter_rows(
    rows: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, count: int,
    half: int, impl: str = "auto",
) -> None:  # fmt: skip
    """In place: keys[targets[first + k]] = rows[first + k] and values[targets[first + k]] =
    rows[half + first + k] for k < count.

    rows [M, W], keys / values [N, W] (contiguous, one dtype; any row width and element size:
    rows move bit for bit), targets [>= first + count] int64 on the same device. Rows of keys or
    values named twice: one writer wins. Unchecked beyond shapes (the daemon's hot path)."""
    if count <= 0:
        return
    if rows.dim() != 2 or keys.shape[1:] != rows.shape[1:] or values.shape[1:] != rows.shape[1:]:
        raise ValueError(f"rows {tuple(rows.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)}: "
                         "[M, W] and [N, W] expected")  # fmt: skip
    if keys.dtype != rows.dtype or values.dtype != rows.dtype:
        raise ValueError(f"keys {keys.dtype}, values {values.dtype}: rows are {rows.dtype}")
    if use_triton(impl, keys.device):
        from kvrecall.kernels.scatter_rows_triton import scatter_rows_triton

        scatter_rows_triton(rows, targets, keys, values, first, count, half)
        return
    scatter_rows_reference(rows, targets, keys, values, first, count, half)


def scatter_rows_reference(
    rows: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, count: int,
    half: int,
) -> None:  # fmt: skip
    where = targets[first : first + count]
    keys.index_copy_(0, where, rows[first : first + count])
    values.index_copy_(0, where, rows[half + first : half + first + count])
