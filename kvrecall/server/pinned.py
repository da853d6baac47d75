"""Page-locked host memory of exactly the size asked for (the daemon's host tier).

`torch.empty(n, pin_memory=True)` goes through PyTorch's caching host allocator, which rounds
every request up to a power of two: a 141.8 GiB host tier asks the driver for 256 GiB and fails
on a 251 GiB machine (128K x 8 on an H200 host), and a 70 GiB one pins 128 GiB. Here the
memory is an anonymous mapping of the exact size, touched by a few threads at once (a fresh
VM grows its memory as it is touched), then registered with the driver in one call
(cudaHostRegister: portable and mapped, so every kernel reads it over PCIe by its host
address). The owner keeps the returned PinnedBuffer alive as long as the tensor and calls
release() once nothing reads it.

Huge pages (`hugepages`, the default): the mapping is advised MADV_HUGEPAGE before it is
touched, so where the kernel's transparent huge pages are `always` or `madvise` it is backed
by 2 MiB pages. A retrieval's host gather (kernels/placement_staged.py) reads hundreds of
thousands of scattered 256-byte rows; over 4 KiB pages each row is a TLB miss whose page
walk reads page tables that do not fit any cache (8 bytes per 4 KiB: 80 MiB for a 40 GiB tier).
"""

from __future__ import annotations

import logging
import mmap
import time
from concurrent.futures import ThreadPoolExecutor

import torch

log = logging.getLogger("kvrecall.pinned")

_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped
_TOUCH_CHUNK = 1 << 30
_TOUCH_THREADS = 4


class PinnedBuffer:
    """`nbytes` of page-locked host memory as a uint8 tensor (`tensor`)."""

    def __init__(self, nbytes: int, hugepages: bool = True) -> None:
        if nbytes <= 0:
            raise ValueError("nbytes must be positive")
        started = time.perf_counter()
        self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.hugepages = hugepages and advise_hugepages(self._map)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        starts = range(0, nbytes, _TOUCH_CHUNK)
        with ThreadPoolExecutor(_TOUCH_THREADS) as pool:  # zero_ runs without the interpreter lock
            list(pool.map(lambda a: self.tensor[a : a + _TOUCH_CHUNK].zero_(), starts))
        error = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, _PORTABLE_MAPPED)
        if int(error) != 0:
            self._close_map()
            raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.1f} GiB failed with CUDA error {int(error)}")
        self.registered = True
        log.info("pinned %.1f GiB of host memory in %.1f s (%s)", nbytes / 2**30, time.perf_counter() - started,
                 f"huge pages advised; transparent huge pages: {thp_mode()}" if self.hugepages else "4 KiB pages")  # fmt: skip

    def _close_map(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        try:
            self._map.close()
        except BufferError:  # a view still exports the mapping: the process exit unmaps it
            pass

    def release(self) -> None:
        """Unregister and unmap (idempotent). Nothing may read the tensor afterwards."""
        if self.registered:
            torch.cuda.synchronize()  # no kernel may still be reading it
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False
            self._close_map()


def advise_hugepages(region: mmap.mmap) -> bool:
    """madvise(MADV_HUGEPAGE) on `region`; False where the platform or kernel refuses it."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        region.madvise(advice)
    except OSError:
        return False
    return True


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always | madvise | never), or unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def pinned_bytes(nbytes: int, hugepages: bool = True) -> tuple[torch.Tensor, PinnedBuffer | None]:
    """A page-locked uint8 tensor of exactly `nbytes` and its owner; when registering fails
    (an old driver, a locked-memory limit), PyTorch's pinned allocator instead (owner None),
    with a warning that it may round the size up to a power of two."""
    try:
        buffer = PinnedBuffer(nbytes, hugepages)
        return buffer.tensor, buffer
    except (RuntimeError, OSError, AttributeError) as exc:
        log.warning("exact-size pinning failed (%s); using PyTorch's pinned allocator, which rounds %.1f GiB "
                    "up to a power of two", exc, nbytes / 2**30)  # fmt: skip
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), None
