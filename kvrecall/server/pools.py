"""The daemon's two memory tiers and their accounting.

* HostPool: the full KV of every sequence, in fixed-size pages of one big buffer — pinned
  host memory of exactly its size when CUDA is present (server/pinned.py; the GPU reads it
  directly), a sealed memfd
  otherwise (kvrecall/shm.py). The pool owns every page; a SequenceStore borrows pages and returns
  them on release. Pages are reused, so memory stays flat over long serving.
* DevicePool: working sets, one segment each (GPU memory mapped by CUDA IPC, or a sealed
  memfd on a CPU-only host, handed to its worker by file descriptor), so a worker maps its
  own session's memory and nothing else, and cannot shrink it under the daemon; plus each
  session's policy metadata (reserved beside its segment: the policy allocates it on the
  device itself). The pool counts both against its capacity.

Both answer "full" with ResourceExhausted naming what is free, never by crashing, and never
touch memory that is already handed out.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import torch

from kvrecall.server.errors import ResourceExhausted
from kvrecall.server.pinned import PinnedBuffer, pinned_bytes
from kvrecall.shm import ShmSegment, shm_name

log = logging.getLogger("kvrecall.pools")

MiB = 1 << 20


@dataclass(frozen=True)
class PoolUsage:
    tier: str
    kind: str
    capacity_bytes: int
    used_bytes: int

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes


class HostPool:
    """Fixed-size pages of one host buffer, handed out from a free list."""

    def __init__(self, capacity_bytes: int, page_bytes: int = 2 * MiB, pinned: bool = False, hugepages: bool = True) -> None:
        if page_bytes <= 0 or page_bytes % 256:
            raise ValueError("page_bytes must be a positive multiple of 256")
        self.page_bytes = page_bytes
        self.num_pages = max(1, capacity_bytes // page_bytes)
        nbytes = self.num_pages * page_bytes
        self._segment: ShmSegment | None = None
        self._pinned: PinnedBuffer | None = None
        if pinned:
            self.kind = "pinned"
            self.buffer, self._pinned = pinned_bytes(nbytes, hugepages)  # (server/pinned.py: huge pages)
        else:
            # A memfd commits pages lazily (an idle pool costs no RAM); sealed, nobody can shrink it.
            self.kind = "shm"
            self._segment = ShmSegment.create_sealed(shm_name("host"), nbytes)
            self.buffer = self._segment.tensor
        self._free: deque[int] = deque(range(self.num_pages))
        self._owner_pages: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return (self.num_pages - len(self._free)) * self.page_bytes

    def usage(self) -> PoolUsage:
        return PoolUsage("host", self.kind, self.capacity_bytes, self.used_bytes)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int, owner: str) -> list[int]:
        """Borrow `num_pages` pages for `owner`; ResourceExhausted when they are not free."""
        with self._lock:
            if num_pages > len(self._free):
                raise ResourceExhausted(
                    f"host pool: {num_pages} pages ({num_pages * self.page_bytes} bytes) requested, "
                    f"{len(self._free)} pages ({len(self._free) * self.page_bytes} bytes) free of "
                    f"{self.capacity_bytes} bytes"
                )
            pages = [self._free.popleft() for _ in range(num_pages)]
            self._owner_pages[owner] = self._owner_pages.get(owner, 0) + num_pages
            return pages

    def free(self, pages: list[int], owner: str) -> None:
        with self._lock:
            # Most recently freed first: reused pages are already resident, so RSS stays flat.
            self._free.extendleft(pages)
            left = self._owner_pages.get(owner, 0) - len(pages)
            if left > 0:
                self._owner_pages[owner] = left
            else:
                self._owner_pages.pop(owner, None)

    def copy_page(self, source: int, target: int) -> None:
        """Copy page `source` into page `target` (a shared prefix's last, partial page into a
        session's own page, which the session then writes its next tokens into)."""
        n = self.page_bytes
        self.buffer[target * n : (target + 1) * n].copy_(self.buffer[source * n : (source + 1) * n])

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole pool as a flat tensor of `dtype` (page_bytes is a multiple of every itemsize)."""
        return self.buffer.view(dtype)

    def close(self) -> None:
        if self._segment is not None:
            self._segment.release()
        if self._pinned is not None:
            self.buffer = torch.empty(0, dtype=torch.uint8)
            self._pinned.release()


class DeviceSegment:
    """One working set's memory: a uint8 tensor plus how a worker maps it."""

    def __init__(self, nbytes: int, device: torch.device, metadata_bytes: int = 0) -> None:
        self.nbytes = nbytes
        self.metadata_bytes = metadata_bytes  # reserved for the session's policy metadata
        self.device = device
        self.shm: ShmSegment | None = None
        self.ipc_handle: bytes | None = None
        if device.type == "cuda":
            from kvrecall.cuda_ipc import allocate_shareable

            self.tensor, self.ipc_handle, self._cuda_owner = allocate_shareable(nbytes, device)
        else:
            self.shm = ShmSegment.create_sealed(shm_name("ws"), nbytes, keep_fd=True)
            self.tensor = self.shm.tensor

    def release(self) -> None:
        if self.shm is not None:
            self.shm.release()
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._cuda_owner = None


class DevicePool:
    """Byte-accounted working-set segments on the serving device."""

    def __init__(self, capacity_bytes: int, device: torch.device) -> None:
        self.capacity_bytes = capacity_bytes
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "shm"
        self._used = 0
        self._metadata = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def metadata_bytes(self) -> int:
        """Of used_bytes, the part reserved for policy metadata."""
        return self._metadata

    def usage(self) -> PoolUsage:
        return PoolUsage("device", self.kind, self.capacity_bytes, self._used)

    def allocate(self, nbytes: int, metadata_bytes: int = 0) -> DeviceSegment:
        """A working-set segment of `nbytes`, with `metadata_bytes` reserved beside it."""
        total = nbytes + metadata_bytes
        self._claim(total, metadata_bytes, f"working set of {nbytes} bytes + policy metadata of {metadata_bytes} bytes")
        try:
            return DeviceSegment(nbytes, self.device, metadata_bytes)
        except BaseException:
            self._give_back(total, metadata_bytes)
            raise

    def reserve(self, metadata_bytes: int) -> None:
        """Count `metadata_bytes` of policy metadata held outside any session (a shared
        prefix's prompt index); ResourceExhausted when they do not fit."""
        self._claim(metadata_bytes, metadata_bytes, f"policy metadata of {metadata_bytes} bytes")

    def unreserve(self, metadata_bytes: int) -> None:
        self._give_back(metadata_bytes, metadata_bytes)

    def _claim(self, total: int, metadata_bytes: int, what: str) -> None:
        """Count `total` bytes (`metadata_bytes` of them metadata), or ResourceExhausted naming `what`."""
        with self._lock:
            if self._used + total > self.capacity_bytes:
                raise ResourceExhausted(
                    f"device pool: {what} requested, {self.capacity_bytes - self._used} bytes free of "
                    f"{self.capacity_bytes}"
                )
            self._used += total
            self._metadata += metadata_bytes

    def _give_back(self, total: int, metadata_bytes: int) -> None:
        with self._lock:
            self._used -= total
            self._metadata -= metadata_bytes

    def free(self, segment: DeviceSegment) -> None:
        segment.release()
        self._give_back(segment.nbytes + segment.metadata_bytes, segment.metadata_bytes)
