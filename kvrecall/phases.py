"""Where a Boundaries call's time goes in the daemon's thread: its work split into phases.

A retrieval's answer waits for host work (selection launches, the host row gather) and for
the GPU (the plan's sync, the DMAs, the last sync), and beside a decoding worker each wait
for the GPU can take a time slice. serve_step runs under a PhaseClock; the code on its way
calls `mark(name)` as each phase ends, which adds the seconds since the previous mark to
`name` (nothing when no clock runs: a mark costs a thread-local lookup). The daemon observes
every call's phases in the kvrecall_boundaries_phase_seconds histogram (by phase and by
whether the call retrieved), and with `phases_out` set (KVRECALL_PHASES_OUT) writes each
phase's mean and quantiles per kind of call to that path at shutdown.

Phases, in order (a phase a call did not reach is absent):
  locks         taking the sessions' busy locks (another call on the same sessions runs)
  notices       the AppendNotices (their launches; a notice alone: Session.append)
  select        the retrievals' scoring, selection and expansion (Policy.on_boundaries)
  place_launch  the placement kernel and, when staged, its plan's device ops (host launch time)
  plan_sync     waiting for the plan (the rows the host gathers): the GPU's queue, a time slice
  gather        the host's row gather into pinned staging (index_select)
  dma_wait      waiting for a staging chunk's earlier DMA to end
  dma_launch    queueing a chunk's DMA
  index_copies  queueing the index copies into the working sets
  place         a placement's remaining host work (unstaged placements: all of it)
  sync          the one stream sync before the answer (the queued copies and kernels)
  finish        accounting (the placements' counts)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = (
    "locks", "notices", "select", "place_launch", "plan_sync", "gather", "dma_wait", "dma_launch",
    "index_copies", "place", "close", "host_fetch", "host_score", "host_topk",
    "host_select", "host_plan", "host_rows", "host_upload", "sync", "finish",
)  # fmt: skip
KINDS = ("notices", "retrievals")
KEPT = 4096  # calls each kind keeps for the summary (the latest)

_local = threading.local()


class PhaseClock:
    """Seconds per phase of one call (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


@contextmanager
def running(clock: PhaseClock) -> Iterator[PhaseClock]:
    """`clock` receives this thread's marks inside the block."""
    outer = getattr(_local, "clock", None)
    _local.clock = clock
    try:
        yield clock
    finally:
        _local.clock = outer


def mark(name: str) -> None:
    """End phase `name` on this thread's running clock (none: nothing)."""
    clock = getattr(_local, "clock", None)
    if clock is not None:
        clock.mark(name)


class PhaseLog:
    """The latest KEPT calls' phases per kind, summarised for KVRECALL_PHASES_OUT."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._calls: dict[str, deque[dict[str, float]]] = {kind: deque(maxlen=KEPT) for kind in KINDS}
        self._lock = threading.Lock()

    def add(self, kind: str, seconds: dict[str, float]) -> None:
        with self._lock:
            self._calls[kind].append(dict(seconds))

    def summary(self) -> dict:
        out: dict = {"phases": list(PHASES), "unit": "ms"}
        with self._lock:
            calls = {kind: list(rows) for kind, rows in self._calls.items()}
        for kind, rows in calls.items():
            if not rows:
                continue
            table = {}
            for phase in PHASES:
                values = sorted(row.get(phase, 0.0) * 1e3 for row in rows)
                table[phase] = {
                    "mean": round(sum(values) / len(values), 4),
                    "p50": round(values[len(values) // 2], 4),
                    "p90": round(values[min(len(values) - 1, (9 * len(values)) // 10)], 4),
                    "max": round(values[-1], 4),
                }
            totals = sorted(sum(row.values()) * 1e3 for row in rows)
            out[kind] = {"calls": len(rows), "total_ms_mean": round(sum(totals) / len(totals), 4), "phases": table}
        return out

    def write(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.summary(), f, indent=2)
