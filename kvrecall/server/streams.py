"""The CUDA streams a daemon's session work runs on.

Retrievals, ingests and chunks run on the device's current stream: the default stream in a
daemon process; in a daemon embedded in its worker's process (server.embedded), a stream of the
highest priority made for its threads, since the default stream there is the worker's too and
would queue the daemon's kernels behind the worker's steps. A Boundaries call
that only notices (every event an AppendNotice: the worker's next step waits for it) runs on
the *notice stream* instead, so its one sync waits for its own kernels and not for the
scoring, selection and placement kernels of background retrievals queued before it (with a
lag, a batch's retrievals are in flight almost all the time). Per session, order needs no
stream: every call holds its sessions' locks and syncs its stream before it answers.

Two streams share one caching allocator, which hands a freed block only to allocations on the
stream it was allocated on, and only checks that stream. A state tensor a call drops while
kernels it queued on another stream may still read it must say so first (`retire`), or a
call on its owner stream could reuse the block under those kernels. The notice path drops one
such tensor (louiskv's open segment sum); temporaries are allocated on the call's own stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

_NOTICE: dict[int, torch.cuda.Stream] = {}
_LOCK = threading.Lock()
_PRIORITY = 0  # of the streams made here: 0 (CUDA's default), or HIGHEST for an embedded daemon
HIGHEST = -100  # (torch maps it to the device's highest stream priority)


def set_priority(priority: int) -> None:
    """The priority of the streams made from now on (an embedded daemon's: HIGHEST, so that its
    kernels' blocks go before a decode step's waiting ones in the context they share)."""
    global _PRIORITY
    _PRIORITY = priority


def daemon_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream of the current priority for a daemon's session work (an embedded daemon's: its
    threads' current stream instead of the default stream it would share with the worker)."""
    return torch.cuda.Stream(device, priority=_PRIORITY)


def notice_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The notice stream of a CUDA device (one per device, made on first use); None on CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        stream = _NOTICE.get(index)
        if stream is None:
            stream = _NOTICE[index] = torch.cuda.Stream(index, priority=_PRIORITY)
        return stream


def on_stream(stream: torch.cuda.Stream | None, func: Callable[..., T], *args) -> T:
    """func(*args) with `stream` current in this thread (None: as it is)."""
    if stream is None:
        return func(*args)
    with torch.cuda.stream(stream):
        return func(*args)


def retire(tensor: torch.Tensor | None) -> None:
    """Before dropping a state tensor that kernels queued on the current stream may still read:
    its block goes back to the allocator only after them, whichever stream allocated it."""
    if tensor is not None and tensor.is_cuda:
        tensor.record_stream(torch.cuda.current_stream(tensor.device))
