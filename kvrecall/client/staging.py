"""Staging a worker's prompt KV for IngestPrompt through its session's transport.

The worker owns the staging memory and frees it when the call returns: a shared-memory
segment (CPU), a CUDA allocation exported by IPC handle (GPU), or inline bytes (remote).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kvrecall.dtypes import WIRE_OF_TORCH
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb


@contextlib.contextmanager
def staged(tensor: torch.Tensor, transport: int) -> Iterator[pb.TensorRef]:
    """A TensorRef for `tensor` valid inside the `with` block."""
    tensor = tensor.contiguous()
    if transport == pb.TRANSPORT_INLINE:
        yield inline_ref(tensor)
        return
    nbytes = tensor.numel() * tensor.element_size()
    ref = pb.TensorRef(dtype=WIRE_OF_TORCH[tensor.dtype], shape=list(tensor.shape))
    if transport == pb.TRANSPORT_SHM:
        segment = ShmSegment.create(shm_name("stage"), max(nbytes, 1))
        try:
            segment.tensor[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            ref.shm.name = segment.name
            ref.shm.offset = 0
            yield ref
        finally:
            segment.release()
        return
    from kvrecall.cuda_ipc import allocate_shareable

    buffer, handle, owner = allocate_shareable(nbytes, tensor.device)
    buffer[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    torch.cuda.current_stream(tensor.device).synchronize()
    ref.cuda_ipc.handle = handle
    ref.cuda_ipc.offset = 0
    ref.cuda_ipc.device = tensor.device.index or 0
    try:
        yield ref
    finally:
        del buffer, owner
