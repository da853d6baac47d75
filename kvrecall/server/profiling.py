"""The daemon's own profile of its Boundaries work, for finding where a step's daemon time goes.

With `profile_out` set (KVRECALL_PROFILE_OUT), every Boundaries call's work (server/step_batch.py
serve_step, in whichever thread runs it) runs under cProfile; the calls of AppendNotices only
and those with retrievals are kept apart. At shutdown the busiest functions of each kind (own
time per call) are written to that path as JSON. Off by default: cProfile slows the host work
it measures (compare its shares, not its absolute times), and on Python 3.12 a profile sees
every thread's calls while it is on (sys.monitoring is per interpreter), so a call's profile
can hold the retrievals other threads ran meanwhile.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

KINDS = ("notices", "retrievals")


class OpsProfiler:
    def __init__(self, path: str) -> None:
        self.path = path
        self._profiles = {kind: cProfile.Profile() for kind in KINDS}
        self._calls = dict.fromkeys(KINDS, 0)
        self._skipped = dict.fromkeys(KINDS, 0)
        self._lock = threading.Lock()
        self._active = threading.Lock()

    def run(self, kind: str, func: Callable[..., T], *args) -> T:
        """func(*args), profiled unless another call is (Python 3.12 allows one profiler at a
        time per interpreter): those run unprofiled and are counted as `skipped`."""
        if not self._active.acquire(blocking=False):
            with self._lock:
                self._skipped[kind] += 1
            return func(*args)
        profiler = self._profiles[kind]  # enabled again per call: nothing to merge on the way
        try:
            profiler.enable()
            try:
                return func(*args)
            finally:
                profiler.disable()
        finally:
            self._active.release()
            with self._lock:
                self._calls[kind] += 1

    def summary(self, top: int = 30) -> dict:
        out: dict = {}
        with self._lock:
            counts = dict(self._calls)
            skipped = dict(self._skipped)
        with self._active:  # not while a call is profiled
            for kind in KINDS:
                calls = counts[kind]
                if not calls:
                    continue
                stats = pstats.Stats(self._profiles[kind])
                rows = []
                for (filename, line, name), (_, ncalls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
                    rows.append({
                        "function": f"{filename.rsplit('/', 1)[-1]}:{line}:{name}",
                        "own_ms_per_call": round(1e3 * own / calls, 4), "cum_ms_per_call": round(1e3 * cum / calls, 4),
                        "calls_per_call": round(ncalls / calls, 2),
                    })  # fmt: skip
                out[kind] = {"calls": calls, "skipped": skipped[kind], "top": sorted(rows, key=lambda r: -r["own_ms_per_call"])[:top]}
        return out

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.summary(), f, indent=2)
