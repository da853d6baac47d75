"""TensorRef <-> torch.Tensor, for both sides of the wire.

Three locations (proto TensorRef.location): a POSIX shared-memory segment, a CUDA IPC
handle, or inline bytes. Bytes are raw little-endian array data described by dtype and
shape; nothing is ever unpickled. Opening a ref returns a `MappedTensor` whose `close()`
unmaps it; the tensor must not be used after close. A worker's shared-memory segment is
copied, never mapped (kvrecall.shm.read_segment): the worker cannot fault the reader by
truncating it. Working sets are mapped from file descriptors (`map_segment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrecall.dtypes import TORCH_OF_WIRE, WIRE_OF_TORCH, itemsize
from kvrecall.v1 import kvrecall_pb2 as pb

# Largest tensor a ref may describe (bytes): a sanity bound against absurd shapes.
MAX_TENSOR_BYTES = 1 << 40


class TensorRefError(ValueError):
    """A TensorRef that cannot be opened; `field` names the offending part."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass
class MappedTensor:
    tensor: torch.Tensor
    _closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        self.tensor = torch.empty(0)
        for closer in self._closers:
            closer()
        self._closers.clear()


def ref_dtype_shape(ref: pb.TensorRef, field_name: str) -> tuple[torch.dtype, tuple[int, ...], int]:
    dtype = TORCH_OF_WIRE.get(ref.dtype)
    if dtype is None:
        raise TensorRefError(f"{field_name}.dtype", f"unsupported dtype {ref.dtype}")
    shape = tuple(int(s) for s in ref.shape)
    if not shape:
        raise TensorRefError(f"{field_name}.shape", "required")
    nbytes = math.prod(shape) * itemsize(dtype)
    if nbytes > MAX_TENSOR_BYTES:
        raise TensorRefError(f"{field_name}.shape", f"{shape} describes {nbytes} bytes, too large")
    return dtype, shape, nbytes


def open_ref(ref: pb.TensorRef, field_name: str) -> MappedTensor:
    """Copy (shm), map (cuda_ipc) or view (inline) the tensor a ref describes."""
    dtype, shape, nbytes = ref_dtype_shape(ref, field_name)
    which = ref.WhichOneof("location")
    if which == "inline_data":
        data = ref.inline_data
        if len(data) != nbytes:
            raise TensorRefError(
                f"{field_name}.inline_data", f"{len(data)} bytes for shape {shape} {dtype} ({nbytes} expected)"
            )
        if nbytes == 0:
            return MappedTensor(torch.empty(shape, dtype=dtype))
        return MappedTensor(torch.frombuffer(bytearray(data), dtype=dtype).view(shape))
    if which == "shm":
        from kvrecall.shm import read_segment

        offset = ref.shm.offset
        if offset % itemsize(dtype):
            raise TensorRefError(f"{field_name}.shm.offset", f"{offset} is not aligned to {dtype}")
        try:
            data = read_segment(ref.shm.name, offset, nbytes)
        except FileNotFoundError:
            raise TensorRefError(f"{field_name}.shm.name", f"no shared-memory segment {ref.shm.name!r}") from None
        except (ValueError, OSError) as exc:
            raise TensorRefError(f"{field_name}.shm", str(exc)) from None
        return MappedTensor(data.view(dtype).view(shape))
    if which == "cuda_ipc":
        from kvrecall.cuda_ipc import open_handle

        return open_handle(ref.cuda_ipc, dtype, shape, nbytes, field_name)
    raise TensorRefError(field_name, "no location set (shm, cuda_ipc or inline_data)")


def map_segment(
    segment, refs: list[pb.TensorRef], names: list[str]
) -> list[torch.Tensor]:
    """Views of a mapped working-set segment (kvrecall.shm.ShmSegment) at each ref's offset."""
    views = []
    for ref, name in zip(refs, names, strict=True):
        dtype, shape, nbytes = ref_dtype_shape(ref, name)
        offset = ref.shm.offset
        if offset % itemsize(dtype) or offset + nbytes > segment.nbytes:
            raise TensorRefError(f"{name}.shm.offset", f"{offset} (+{nbytes} bytes) does not fit the segment")
        views.append(segment.tensor[offset : offset + nbytes].view(dtype).view(shape))
    return views


def inline_ref(tensor: torch.Tensor) -> pb.TensorRef:
    """A ref carrying the tensor's bytes inline."""
    t = tensor.detach().contiguous().cpu()
    raw = t.view(torch.uint8) if t.numel() else t
    return pb.TensorRef(dtype=WIRE_OF_TORCH[t.dtype], shape=list(t.shape), inline_data=raw.numpy().tobytes())


def describe(tensor_dtype: torch.dtype, shape: tuple[int, ...]) -> pb.TensorRef:
    return pb.TensorRef(dtype=WIRE_OF_TORCH[tensor_dtype], shape=list(shape))
