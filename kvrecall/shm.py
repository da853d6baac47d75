"""Shared-memory segments on CPU hosts: sealed memfds the daemon owns, named /dev/shm
segments a worker stages tensors in.

* The daemon's memory (host pool, working sets) lives in memfds sealed against shrinking and
  growing (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): nobody, the daemon included, can
  truncate them, so a mapping of one can never fault with SIGBUS. They have no name in
  /dev/shm; a worker receives its working set's file descriptor over a unix socket
  (kvrecall/fdpass.py).
* A worker stages tensors in named /dev/shm segments it creates. The daemon never maps
  those: `read_segment` copies them with pread, which answers a short file with an error
  instead of a fault, whatever the worker does to the file meanwhile.

A segment owns its memory; `release()` unmaps it (and unlinks / closes what it created). The
tensor views handed out stay valid in the worker until the worker unmaps them.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import stat
from dataclasses import dataclass, field

import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "kvrecall-"
# No shrinking (the SIGBUS lever), no growing, and no removing these seals.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def shm_name(kind: str) -> str:
    """A fresh segment name carrying this process's pid, so stale ones can be found and removed."""
    return f"{SHM_PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}"


@dataclass
class ShmSegment:
    """A shared-memory segment mapped into this process: a named /dev/shm file (a worker's
    staging) or a sealed memfd (the daemon's memory, or a working set a worker received)."""

    name: str
    nbytes: int
    _mmap: mmap.mmap = field(repr=False)
    tensor: torch.Tensor = field(repr=False)  # uint8 [nbytes] view of the mapping
    owner: bool = True  # a named segment this process created: release() unlinks it
    fd: int = -1        # a sealed memfd kept open to hand to a worker: release() closes it

    @staticmethod
    def create(name: str, nbytes: int) -> ShmSegment:
        """A named /dev/shm segment, readable by this user only (a worker's staging)."""
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return ShmSegment(name, nbytes, mapping, torch.frombuffer(mapping, dtype=torch.uint8), True)

    @staticmethod
    def create_sealed(name: str, nbytes: int, keep_fd: bool = False) -> ShmSegment:
        """A sealed memfd of `nbytes` (pages committed lazily). With `keep_fd`, its file
        descriptor stays open in `fd` so it can be handed to a worker; release() closes it."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.close(fd)
            raise
        if not keep_fd:
            os.close(fd)
            fd = -1
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        return ShmSegment(name, nbytes, mapping, tensor, owner=False, fd=fd)

    @staticmethod
    def map_fd(fd: int, name: str, min_bytes: int) -> ShmSegment:
        """Map a segment received as a file descriptor (worker side); takes ownership of `fd`."""
        try:
            size = os.fstat(fd).st_size
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tensor = torch.empty(0, dtype=torch.uint8)
        # torch.frombuffer does not pin the mapping: callers must drop every view first
        # (sessions release under their lock, after the last operation on them).
        try:
            self._mmap.close()
        except BufferError:
            pass


def read_segment(name: str, offset: int, nbytes: int) -> torch.Tensor:
    """Copy `nbytes` at `offset` of the worker's segment /dev/shm/`name` into a fresh uint8
    tensor. pread, not mmap: a segment that is (or becomes) too short is a ValueError, never
    a SIGBUS. O_NOFOLLOW and a regular-file check: a name cannot lead to other files."""
    if "/" in name or not name:
        raise ValueError(f"bad shared-memory name {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{name!r} is not a shared-memory segment")
        if info.st_size < offset + nbytes:
            raise ValueError(f"segment {name!r} holds {info.st_size} bytes, {offset + nbytes} needed")
        out = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(out.numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"segment {name!r} shrank to {offset + done} bytes while being read")
            done += got
        return out
    finally:
        os.close(fd)


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
