"""A retrieval's selection replayed as one CUDA graph (issue #17).

A worker decoding on the same GPU as the daemon is preempted once for every kernel the daemon
launches while it runs, and launches spread out by host work cost it most: on an H200, 70
kernels with 30 us of Python between them stretched a captured 6.2 ms step by 1.130x, the same
70 as one CUDA graph by 1.068x (`scripts/gpu_timeslice_probe.py --continuous`). louiskv's
boundary selection (score every unit, choose under the budget, expand to token positions, keep
the pinned tokens) is ~25 such launches; `CapturedCall` records them once per session and shape
and replays them as one graph launch, with two copies in and two out.

What a call reads besides its `inputs` (the session's unit table) must keep its addresses while
its key holds: the caller puts shapes and addresses in the key, and a new key runs the call
eagerly and captures it for the next one (so a capture never waits for a kernel to compile).
Each graph has a memory pool of its own (its intermediates: a few MB for a 32K-token session of
a Llama-3-8B shape), freed with the graph: a pool shared through one graph_pool_handle() is
released by PyTorch once the last graph using it is gone, and a later capture into it fails an
internal assert of the caching allocator (seen on torch 2.11, H200). A per-device lock keeps
captures apart and each replay next to the copies of its outputs. A capture that fails (a host
sync inside, a driver that refuses) logs, counts, and that call runs eagerly from then on.

Off by default (`capture_selection` in the daemon's config, KVRECALL_CAPTURE_SELECTION); never on
a CPU device.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable, Sequence

import torch

log = logging.getLogger("kvrecall.captured")

_enabled = False
_GUARD = threading.Lock()
_DEVICES: dict[int, tuple[threading.Lock, torch.cuda.Stream]] = {}
STATS: collections.Counter = collections.Counter()  # "captures", "replays", "failures"


def configure(enabled: bool) -> None:
    """Turn capture on or off for this process (the daemon's `capture_selection`)."""
    global _enabled
    _enabled = bool(enabled)


def enabled(device: torch.device) -> bool:
    return _enabled and device.type == "cuda"


def _device_state(device: torch.device) -> tuple[threading.Lock, torch.cuda.Stream]:
    """(lock, capture stream) of a CUDA device, made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _GUARD:
        state = _DEVICES.get(index)
        if state is None:
            state = _DEVICES[index] = (threading.Lock(), torch.cuda.Stream(index))
        return state


class CapturedCall:
    """fn(*inputs) -> a tuple of tensors, replayed as one CUDA graph while the caller's key
    stays the same (see the module's docstring). Not copied with its owner: a copy starts
    empty (its tables are new tensors)."""

    def __init__(self) -> None:
        self.key: Hashable = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.broken = False

    def __deepcopy__(self, memo: dict) -> CapturedCall:
        return CapturedCall()

    def __call__(
        self, key: Hashable, fn: Callable[..., tuple[torch.Tensor, ...]], inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        device = inputs[0].device
        if self.broken or not enabled(device):
            return fn(*inputs)
        lock, stream = _device_state(device)
        with lock:
            if self.graph is not None and key == self.key:
                for static, value in zip(self.inputs, inputs, strict=True):
                    static.copy_(value)
                self.graph.replay()
                STATS["replays"] += 1
                return tuple(out.clone() for out in self.outputs)
            # The answer now, on the buffers the graph will read (so every kernel it launches is
            # compiled and loaded for their strides before the capture), then the graph.
            statics = tuple(value.clone() for value in inputs)
            out = fn(*statics)
            self._capture(key, fn, statics, stream)
            return out

    def _capture(self, key: Hashable, fn: Callable, statics: tuple[torch.Tensor, ...], stream) -> None:
        self.graph, self.inputs, self.outputs, self.key = None, (), (), None
        current = torch.cuda.current_stream(statics[0].device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(capture_error_mode="thread_local")  # a pool of its own
                try:
                    outputs = fn(*statics)
                finally:
                    graph.capture_end()
        except Exception as error:  # noqa: BLE001  (any failure: run eagerly, never fail a retrieval)
            self.broken = True
            STATS["failures"] += 1
            log.warning("capturing a selection as a CUDA graph failed (%s): it runs kernel by kernel", error)
            return
        current.wait_stream(stream)
        self.graph, self.inputs, self.outputs, self.key = graph, statics, tuple(outputs), key
        STATS["captures"] += 1
