"""CUDA IPC: device memory one process allocates and another maps, zero-copy.

Handles travel as raw 64-byte cudaIpcMemHandle_t bytes (never pickled). CuPy's runtime
bindings do the calls; each working set is its own cudaMalloc allocation so a worker maps
its session's memory and nothing else. Imported only on CUDA hosts.

Ordering across the two processes: an interprocess CUDA event per session (64-byte
cudaIpcEventHandle_t, CudaIpcRef.event_handle). The writer records it on its stream after
its writes; the reader's stream waits on it (cudaStreamWaitEvent): the GPU orders the work,
no host waits for anything.

A daemon embedded in its worker's process (kvrecall.server.embedded) hands that process its own
handles, which CUDA will not open there: while one runs (`serve_own_handles`), this module maps a
handle it exported itself to the memory or event itself (an allocation by its owner object, kept
weakly; an event created meanwhile, until its session forgets it). Otherwise handles are opened as always, so a handle of another process is never taken
for one of this process's (the 64 bytes are opaque; two processes' need not differ).
"""

from __future__ import annotations

import weakref

import torch

from kvrecall.transport import MappedTensor, TensorRefError
from kvrecall.v1 import kvrecall_pb2 as pb


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - GPU hosts only
        raise RuntimeError(
            "the CUDA IPC transport needs cupy (pip install cupy-cuda12x or -cuda13x)"
        ) from exc
    return cupy


class Shareable:
    """An allocation's owner (allocate_shareable): frees it when the last reference goes."""

    def __init__(self, memory, array, tensor: torch.Tensor) -> None:
        self.memory, self.array, self.tensor = memory, array, tensor


_exported_memory: weakref.WeakValueDictionary[bytes, Shareable] = weakref.WeakValueDictionary()
# (events cannot be weakly referenced: torch's event type crashes on it; kept while an embedded
# daemon runs, until forget_event)
_exported_events: dict[bytes, torch.cuda.Event] = {}
_own_handles = 0  # embedded daemons running in this process


def serve_own_handles(on: bool) -> None:
    """An embedded daemon starts (on) or stops (off): while any runs, this process's own handles
    map to themselves."""
    global _own_handles
    _own_handles = max(0, _own_handles + (1 if on else -1))
    if not _own_handles:
        _exported_events.clear()


def allocate_shareable(nbytes: int, device: torch.device) -> tuple[torch.Tensor, bytes, Shareable]:
    """A fresh cudaMalloc allocation of `nbytes` as a uint8 tensor, its IPC handle, and the
    owner object that frees it when dropped (keep it as long as the handle is in use)."""
    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        memory = cupy.cuda.Memory(max(nbytes, 1))
        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        tensor = torch.from_dlpack(array)
    owner = Shareable(memory, array, tensor)
    _exported_memory[handle] = owner
    return tensor, handle, owner


def open_handle(
    ref: pb.CudaIpcRef, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, field_name: str
) -> MappedTensor:
    """Map a peer's allocation and view `nbytes` at `ref.offset` as dtype/shape."""
    cupy = _cupy()
    if len(ref.handle) != 64:
        raise TensorRefError(f"{field_name}.cuda_ipc.handle", f"{len(ref.handle)} bytes, 64 expected")
    if ref.device < 0 or ref.device >= torch.cuda.device_count():
        raise TensorRefError(f"{field_name}.cuda_ipc.device", f"no CUDA device {ref.device}")
    owner = _exported_memory.get(bytes(ref.handle)) if _own_handles else None
    if owner is not None:  # this process's allocation (an embedded daemon): the memory itself
        own = owner.tensor
        if own.device.index != ref.device or ref.offset + nbytes > own.numel():
            raise TensorRefError(f"{field_name}.cuda_ipc", f"offset {ref.offset} + {nbytes} bytes on device "
                                 f"{ref.device} outside the allocation ({own.numel()} bytes on {own.device})")  # fmt: skip
        return MappedTensor(own[ref.offset : ref.offset + nbytes].view(dtype).view(shape), [])
    with cupy.cuda.Device(ref.device):
        try:
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(ref.handle)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise TensorRefError(f"{field_name}.cuda_ipc.handle", f"cannot open: {exc}") from None
        memory = cupy.cuda.UnownedMemory(ptr, ref.offset + nbytes, owner=None, device_id=ref.device)
        array = cupy.ndarray(
            (nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, int(ref.offset))
        )
        tensor = torch.from_dlpack(array).view(dtype).view(shape)

    def close() -> None:
        with cupy.cuda.Device(ref.device):
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)

    return MappedTensor(tensor, [close])


def create_event(device: torch.device) -> tuple[torch.cuda.Event, bytes]:
    """A fresh interprocess event on `device` and its 64-byte IPC handle."""
    with torch.cuda.device(device):
        event = torch.cuda.Event(interprocess=True)
        handle = bytes(event.ipc_handle())
    if _own_handles:
        _exported_events[handle] = event
    return event, handle


def forget_event(handle: bytes) -> None:
    """The event of `handle` is no longer handed out (its session closed)."""
    _exported_events.pop(bytes(handle), None)


def open_event(handle: bytes, device: int, field_name: str) -> torch.cuda.Event:
    """A peer's interprocess event, to record or wait on in this process."""
    if len(handle) != 64:
        raise TensorRefError(f"{field_name}.cuda_ipc.event_handle", f"{len(handle)} bytes, 64 expected")
    if device < 0 or device >= torch.cuda.device_count():
        raise TensorRefError(f"{field_name}.cuda_ipc.device", f"no CUDA device {device}")
    own = _exported_events.get(bytes(handle))
    if own is not None:  # this process's event (an embedded daemon)
        return own
    try:
        return torch.cuda.Event.from_ipc_handle(device, handle)
    except RuntimeError as exc:
        raise TensorRefError(f"{field_name}.cuda_ipc.event_handle", f"cannot open: {exc}") from None
