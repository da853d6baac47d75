"""Worker-owned memory the daemon reads through the session's transport (prompt layers, chunks).

A StagingBuffer is a shared-memory segment (CPU), a CUDA allocation exported by IPC handle
(GPU), or plain memory sent as inline bytes (remote). The worker writes `tensor`, sends
`ref()` and frees the buffer with release() once the call that reads it has returned.
`STAGED` counts the bytes held in staging buffers now and at most (what a worker's ingest
costs beyond its model: one layer at a time, tests/integration/test_streamed_ingest.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from kvrecall.dtypes import WIRE_OF_TORCH
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb


class StagedBytes:
    """Bytes held in staging buffers by this process: now, and the peak since reset()."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.now += nbytes
            self.peak = max(self.peak, self.now)

    def reset(self) -> None:
        with self._lock:
            self.peak = self.now


STAGED = StagedBytes()


class StagingBuffer:
    """A tensor of `shape` / `dtype` the daemon can read by TensorRef (see the module doc)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, transport: int, device: torch.device) -> None:
        self.shape, self.dtype, self.transport = tuple(shape), dtype, transport
        numel = 1
        for size in shape:
            numel *= size
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._segment: ShmSegment | None = None
        self._cuda = None
        if transport == pb.TRANSPORT_INLINE:
            self.tensor = torch.empty(shape, dtype=dtype, device=device)
        elif transport == pb.TRANSPORT_SHM:
            self._segment = ShmSegment.create(shm_name("stage"), max(self.nbytes, 1))
            self.tensor = self._segment.tensor[: self.nbytes].view(dtype).view(shape)
        else:
            from kvrecall.cuda_ipc import allocate_shareable

            buffer, self._handle, self._cuda = allocate_shareable(self.nbytes, device)
            self.tensor = buffer[: self.nbytes].view(dtype).view(shape)
            self._device_index = device.index or 0
        STAGED.add(self.nbytes)

    def ref(self) -> pb.TensorRef:
        """The TensorRef of `tensor` (inline: its bytes, copied now)."""
        if self.transport == pb.TRANSPORT_INLINE:
            return inline_ref(self.tensor)
        ref = pb.TensorRef(dtype=WIRE_OF_TORCH[self.dtype], shape=list(self.shape))
        if self._segment is not None:
            ref.shm.name = self._segment.name
            ref.shm.offset = 0
        else:
            ref.cuda_ipc.handle = self._handle
            ref.cuda_ipc.offset = 0
            ref.cuda_ipc.device = self._device_index
        return ref

    def release(self) -> None:
        """Free the memory (idempotent)."""
        if self.tensor is None:
            return
        self.tensor = None
        if self._segment is not None:
            self._segment.release()
        self._cuda = None
        STAGED.add(-self.nbytes)


@contextlib.contextmanager
def staged(tensor: torch.Tensor, transport: int) -> Iterator[pb.TensorRef]:
    """A TensorRef of a copy of `tensor`, valid inside the `with` block."""
    if transport == pb.TRANSPORT_INLINE:
        yield inline_ref(tensor)
        return
    buffer = StagingBuffer(tuple(tensor.shape), tensor.dtype, transport, tensor.device)
    try:
        buffer.tensor.copy_(tensor)
        if tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()
        yield buffer.ref()
    finally:
        buffer.release()
