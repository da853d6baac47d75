"""Argument checks shared by the kernels' launchers: each raises ValueError naming the argument.

Every op runs its checks once, whichever implementation then runs, so a call that fails on
CUDA fails the same way on CPU. Kernels index the last dimension with unit stride and take
the other strides as arguments, hence "innermost dimension contiguous" rather than
"contiguous".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A unit table's representatives may be float8 e4m3 too (the daemon's unit_reps_dtype).
REP_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    tensor: object,
    *,
    rank: int,
    dtypes: Sequence[torch.dtype] | None = None,
) -> None:
    """`tensor` is a torch.Tensor of `rank` dims, one of `dtypes`, innermost dim contiguous."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != rank:
        raise ValueError(f"{name}: expected {rank} dims, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: dtype {str(tensor.dtype).removeprefix('torch.')} not in ({allowed})")
    if rank and tensor.size(-1) > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name}: innermost dimension must be contiguous (stride {tensor.stride(-1)})")


def check_size(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """`tensor.shape[dim] == expected`, where `what` says where `expected` comes from."""
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name}: dim {dim} is {tensor.shape[dim]}, expected {expected} ({what}); shape {tuple(tensor.shape)}"
        )


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    names = list(tensors)
    device = tensors[names[0]].device
    for name in names[1:]:
        if tensors[name].device != device:
            raise ValueError(f"{name}: on {tensors[name].device}, expected {device} (like {names[0]})")
    return device


def check_int(name: str, value: object, minimum: int) -> None:
    """`value` is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_rows(
    src_start: torch.Tensor,
    dst_start: torch.Tensor,
    row_len: int,
    src_numel: int,
    dst_numel: int,
    multiple: int,
) -> bool:
    """Rows [start, start + row_len) lie inside src / dst; returns whether every start is a
    multiple of `multiple`. One host round trip for all of it (a sync if the starts are on a GPU).
    """
    if src_start.numel() == 0 or row_len == 0:
        return True
    dst_start = dst_start.to(src_start.device)
    src_low, src_high, dst_low, dst_high, src_off, dst_off = torch.stack(
        [
            src_start.min(),
            src_start.max(),
            dst_start.min(),
            dst_start.max(),
            (src_start % multiple).max(),
            (dst_start % multiple).max(),
        ]
    ).tolist()
    for name, low, high, numel in (
        ("src_start", src_low, src_high, src_numel),
        ("dst_start", dst_low, dst_high, dst_numel),
    ):
        if low < 0 or high + row_len > numel:
            raise ValueError(f"{name}: rows span [{low}, {high + row_len}), outside the {numel} elements")
    return src_off == 0 and dst_off == 0
