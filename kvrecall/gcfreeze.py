"""Keep the interpreter's full collections short: freeze what setup built.

CPython's cyclic collector holds the interpreter lock while it runs, so every Python thread of
the process stops (the worker's step launches, the daemon's answers), and a full (generation 2)
collection walks every tracked object: after `import torch`, the gRPC stack and a model, ~250K
of them. Beside `kvrecall bench e2e --daemon embedded` on a 2-core host one full collection took
114 ms, and under 0.001 ms with those objects frozen (`scripts/gc_pause_probe.py`,
bench/results/2026-12-03-cpu-gc-pauses.json; in that bench they fell in setup and teardown, the
timed steps saw only young ones). `gc.freeze()` moves every object alive now
into a permanent generation the collector skips; reference counting still frees them, only a
cycle among them is never collected (setup leaves few). The daemon freezes once it serves
(`gc_freeze`, on by default), the worker once its engine is ready, the bench around each timed
configuration.

`unfreeze` runs at exit, so the collector sees every object again at shutdown (an extension's
leak check then finds its objects freed: Triton's bindings print "leaked function" otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import time
from collections.abc import Iterator

_at_exit = False


def freeze() -> int:
    """Collect, then freeze every object alive: -> objects frozen in all."""
    global _at_exit
    gc.collect()
    gc.freeze()
    if not _at_exit:
        atexit.register(gc.unfreeze)
        _at_exit = True
    return gc.get_freeze_count()


@contextlib.contextmanager
def frozen(enabled: bool = True) -> Iterator[None]:
    """freeze() for a block (e.g. a timed run), unfrozen after it so its objects can go."""
    if not enabled:
        yield
        return
    freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Pauses:
    """The cyclic collector's passes while active (a `gc.callbacks` hook, any thread of the
    process): how many per generation and how long they stopped the process."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_ms = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self._started = 0.0

    def _hook(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = min(int(info.get("generation", 0)), 2)
        ms = (time.perf_counter() - self._started) * 1e3
        self.count[generation] += 1
        self.total_ms[generation] += ms
        self.max_ms[generation] = max(self.max_ms[generation], ms)

    def __enter__(self) -> Pauses:
        gc.callbacks.append(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._hook)

    def summary(self) -> dict:
        """Counts per generation, the longest pause and the full (generation 2) passes' time."""
        return {
            "gc_collections": list(self.count),
            "gc_pause_ms_max": round(max(self.max_ms), 3),
            "gc_full_ms_total": round(self.total_ms[2], 3),
        }
