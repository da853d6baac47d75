"""CUDA IPC: device memory one process allocates and another maps, zero-copy.

Handles travel as raw 64-byte cudaIpcMemHandle_t bytes (never pickled). CuPy's runtime
bindings do the calls; each working set is its own cudaMalloc allocation so a worker maps
its session's memory and nothing else. Imported only on CUDA hosts.

Ordering across the two processes: an interprocess CUDA event per session (64-byte
cudaIpcEventHandle_t, CudaIpcRef.event_handle). The writer records it on its stream after
its writes; the reader's stream waits on it (cudaStreamWaitEvent): the GPU orders the work,
no host waits for anything.
"""

from __future__ import annotations

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


def allocate_shareable(nbytes: int, device: torch.device) -> tuple[torch.Tensor, bytes, object]:
    """A fresh cudaMalloc allocation of `nbytes` as a uint8 tensor, its IPC handle, and the
    owner object that frees it when dropped."""
    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        memory = cupy.cuda.Memory(max(nbytes, 1))
        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(memory.ptr))
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        tensor = torch.from_dlpack(array)
    return tensor, handle, (memory, array)


def open_handle(
    ref: pb.CudaIpcRef, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, field_name: str
) -> MappedTensor:
    """Map a peer's allocation and view `nbytes` at `ref.offset` as dtype/shape."""
    cupy = _cupy()
    if len(ref.handle) != 64:
        raise TensorRefError(f"{field_name}.cuda_ipc.handle", f"{len(ref.handle)} bytes, 64 expected")
    if ref.device < 0 or ref.device >= torch.cuda.device_count():
        raise TensorRefError(f"{field_name}.cuda_ipc.device", f"no CUDA device {ref.device}")
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
        return event, bytes(event.ipc_handle())


def open_event(handle: bytes, device: int, field_name: str) -> torch.cuda.Event:
    """A peer's interprocess event, to record or wait on in this process."""
    if len(handle) != 64:
        raise TensorRefError(f"{field_name}.cuda_ipc.event_handle", f"{len(handle)} bytes, 64 expected")
    if device < 0 or device >= torch.cuda.device_count():
        raise TensorRefError(f"{field_name}.cuda_ipc.device", f"no CUDA device {device}")
    try:
        return torch.cuda.Event.from_ipc_handle(device, handle)
    except RuntimeError as exc:
        raise TensorRefError(f"{field_name}.cuda_ipc.event_handle", f"cannot open: {exc}") from None
