"""Memory segments a worker can map: POSIX shared memory (CPU hosts) and CUDA IPC buffers.

A segment owns its memory; `release()` unlinks/frees it. The tensor views handed out stay
valid in the worker until the worker unmaps them (shm) or closes the IPC handle (CUDA).
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
from dataclasses import dataclass, field

import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "kvrecall-"


def shm_name(kind: str) -> str:
    """A fresh segment name carrying the daemon pid, so stale ones can be found and removed."""
    return f"{SHM_PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}"


@dataclass
class ShmSegment:
    """A named POSIX shared-memory segment mapped into this process."""

    name: str
    nbytes: int
    _mmap: mmap.mmap = field(repr=False)
    tensor: torch.Tensor = field(repr=False)  # uint8 [nbytes] view of the mapping
    owner: bool = True

    @staticmethod
    def create(name: str, nbytes: int, mode: int = 0o600) -> ShmSegment:
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        try:
            os.fchmod(fd, mode)  # umask must not narrow the configured mode
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return ShmSegment(name, nbytes, mapping, torch.frombuffer(mapping, dtype=torch.uint8), True)

    @staticmethod
    def open(name: str, min_bytes: int) -> ShmSegment:
        """Map an existing segment (worker side, or the daemon reading ingest staging)."""
        if "/" in name or not name:
            raise ValueError(f"bad shared-memory name {name!r}")
        # O_NOFOLLOW + a regular-file check: a name must not lead the daemon to other files.
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{name!r} is not a shared-memory segment")
            size = info.st_size
            if size < min_bytes:
                raise ValueError(f"segment {name!r} holds {size} bytes, {min_bytes} needed")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return ShmSegment(name, size, mapping, torch.frombuffer(mapping, dtype=torch.uint8), False)

    def release(self) -> None:
        """Unmap (when no tensor view is alive) and, for the owner, unlink."""
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        self.tensor = torch.empty(0, dtype=torch.uint8)
        # torch.frombuffer does not pin the mapping: callers must drop every view first
        # (sessions release under their lock, after the last operation on them).
        try:
            self._mmap.close()
        except BufferError:
            pass


def remove_stale_segments() -> list[str]:
    """Unlink kvrecall segments left by daemons that are no longer running."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(SHM_PREFIX):
            continue
        pid_text = name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
