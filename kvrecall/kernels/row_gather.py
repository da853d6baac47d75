"""Row gather host tier -> working set (every retrieving policy).

Kernel: `row_gather_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    INDEX_DTYPES,
    check_int,
    check_rows,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


def gather_rows(
    src: torch.Tensor,
    src_start: torch.Tensor,
    dst: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    impl: str = "auto",
) -> None:
    """In place: dst[dst_start[i] : dst_start[i] + row_len] = src[src_start[i] : src_start[i] + row_len].

    src, dst: 1-D, contiguous, same dtype; src may be pinned host memory while dst is on CUDA
    (the kernel reads it directly). Starts [N] int, in elements. Bounds are checked (a sync
    when the starts live on the GPU). Overlapping destination rows: one writer wins.
    """
    check_tensor("src", src, rank=1)
    check_tensor("dst", dst, rank=1)
    check_tensor("src_start", src_start, rank=1, dtypes=INDEX_DTYPES)
    check_tensor("dst_start", dst_start, rank=1, dtypes=INDEX_DTYPES)
    if dst.dtype != src.dtype:
        raise ValueError(f"dst: dtype {dst.dtype} differs from src's {src.dtype}")
    check_size("dst_start", dst_start, 0, src_start.shape[0], "N of src_start")
    check_int("row_len", row_len, 0)
    if src.device.type == dst.device.type == "cuda" and src.device != dst.device:
        raise ValueError(f"dst: on {dst.device}, src on {src.device}: one GPU only")
    # The kernel moves 16 bytes per access where every start allows it: checked with the bounds.
    vector = max(1, 16 // src.element_size())
    starts_aligned = check_rows(src_start, dst_start, row_len, src.numel(), dst.numel(), vector)
    device = dst.device if dst.device.type == "cuda" else src.device
    if use_triton(impl, device):
        from kvrecall.kernels.row_gather_triton import gather_rows_triton

        gather_rows_triton(src, src_start, dst, dst_start, row_len, starts_aligned)
        return
    reference.gather_rows(src, src_start, dst, dst_start, row_len)
