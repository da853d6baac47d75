"""Mapping between the wire DType enum and torch dtypes (shared by daemon and SDK)."""

from __future__ import annotations

import torch

from kvrecall.v1 import kvrecall_pb2 as pb

TORCH_OF_WIRE: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_FLOAT8_E4M3FN: torch.float8_e4m3fn,  # (unit table reps only: not a KV dtype)
}
WIRE_OF_TORCH: dict[torch.dtype, int] = {v: k for k, v in TORCH_OF_WIRE.items()}
KV_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
