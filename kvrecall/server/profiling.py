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
import time
from collections.abc import Callable
from typing import TypeVar

import torch

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


def cuda_events(events) -> tuple[list[tuple[float, float]], dict[str, list[float]], dict[str, list[float]]]:
    """A torch.profiler run's CUDA events: the kernels' [start, end) intervals (us), and the
    durations per name of the kernels and, apart, of the copies and memsets (copy engines)."""
    spans: list[tuple[float, float]] = []
    kernels: dict[str, list[float]] = {}
    copies: dict[str, list[float]] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        if event.name.startswith(("Memcpy", "Memset")):
            copies.setdefault(event.name, []).append(end - start)
            continue
        spans.append((start, end))
        kernels.setdefault(event.name, []).append(end - start)
    return spans, kernels, copies


def kernel_timeline(events) -> list[tuple[float, float, str]]:
    """A torch.profiler run's kernels as (start, end, name) (us), copies and memsets left out."""
    return sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
    )  # fmt: skip


GAP_BUCKETS_US = (1.0, 2.0, 5.0, 20.0)


def kernel_gaps(timeline: list[tuple[float, float, str]], steps: int, split_us: float = 200.0, top: int = 8) -> dict:
    """Where the GPU sat idle between one process's kernels over `steps` decode steps: each gap
    between the end of everything before a kernel and its start. Gaps of `split_us` or more are
    taken as the host's time between steps (`between_steps_ms_per_step`); the rest are inside a
    step (a captured graph's launch gaps): their total and count per step, a histogram by length
    (us, GAP_BUCKETS_US's edges), and the `top` kernel pairs (before, after) by the time of the
    gaps between them, so a slow launch shows by name."""
    inside: list[tuple[float, str, str]] = []
    between = 0.0
    reach, last = None, ""
    for start, end, name in sorted(timeline):
        if reach is not None and start > reach:
            gap = start - reach
            if gap >= split_us:
                between += gap
            else:
                inside.append((gap, last, name))
        if reach is None or end >= reach:
            reach, last = end, name
    n = max(1, steps)
    edges = (0.0, *GAP_BUCKETS_US, split_us)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:], strict=False)]
    histogram = dict.fromkeys(labels, 0.0)
    pairs: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in inside:
        k = sum(gap >= e for e in GAP_BUCKETS_US)
        histogram[labels[k]] += 1 / n
        pairs.setdefault((before[:80], after[:80]), []).append(gap)
    ranked = sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "gap_ms_per_step": round(sum(g for g, _, _ in inside) / 1e3 / n, 4),
        "gaps_per_step": round(len(inside) / n, 2),
        "gaps_by_us_per_step": {k: round(v, 2) for k, v in histogram.items()},
        "between_steps_ms_per_step": round(between / 1e3 / n, 4),
        "top_pairs": [{"before": b, "after": a, "per_step": round(len(g) / n, 2), "us_per_step": round(sum(g) / n, 2),
                       "mean_us": round(sum(g) / len(g), 2)} for (b, a), g in ranked],
    }  # fmt: skip


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals (overlapping kernels count once)."""
    return sum(end - start for start, end in merged(spans))


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping [start, end) intervals joined, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def busy_per_bucket(spans: list[tuple[float, float]], bucket: float) -> list[float]:
    """The union's length in each `bucket`-long window from the first start (a timeline)."""
    joined = merged(spans)
    if not joined:
        return []
    origin = joined[0][0]
    out = [0.0] * (int((joined[-1][1] - origin) // bucket) + 1)
    for start, end in joined:
        while start < end:
            k = int((start - origin) // bucket)
            edge = min(end, origin + (k + 1) * bucket)
            out[k] += edge - start
            start = edge
    return out


class KernelProfiler:
    """The daemon's GPU kernels while it serves decode steps (KVRECALL_KERNEL_PROFILE_OUT), for
    finding how much GPU time its work takes from the workers on the same GPU: two processes'
    kernels time-slice, so a worker's step loses about the daemon's busy time (issue #17,
    scripts/gpu_timeslice_probe.py). torch.profiler with CUDA activity only (CUPTI: kernels and
    copies, no host ops) for `seconds` from the first retrieval (a Boundaries call that
    retrieves or a Decode-stream boundary: the decode steps, not the ingests before them); then
    per kernel name its launches and total time, and the union of the kernels' intervals (the
    SM time the daemon held; copies, which run on the copy engines, listed apart) in all and per
    second, written to `path` as JSON. A kernel's recorded time includes any slice it waited out
    while a worker ran, so totals are upper bounds. Off by default; on a CPU daemon, or one that
    never retrieved, the file says so at shutdown."""

    def __init__(self, path: str, device: torch.device, seconds: float = 3.0) -> None:
        self.path = path
        self.device = device
        self.seconds = seconds
        self._profile = None
        self._started = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._state = "idle"  # idle -> running -> written

    def begin(self) -> None:
        """Start the window (at a retrieval); later calls do nothing."""
        if self.device.type != "cuda" or self._state != "idle":
            return
        from torch.profiler import ProfilerActivity, profile

        with self._lock:
            if self._state != "idle":
                return
            self._profile = profile(activities=[ProfilerActivity.CUDA])
            self._profile.start()
            self._started = time.perf_counter()
            self._state = "running"
            self._timer = threading.Timer(self.seconds, self.finish)
            self._timer.daemon = True
            self._timer.start()

    def finish(self) -> None:
        """End the window and write the file (at the window's end, or at shutdown)."""
        with self._lock:
            if self._state == "written":
                return
            if self._timer is not None:
                self._timer.cancel()
            summary = self._summary() if self._state == "running" else self._nothing()
            self._state = "written"
        with open(self.path, "w") as f:
            json.dump(summary, f, indent=2)

    def _nothing(self) -> dict:
        why = "no CUDA device" if self.device.type != "cuda" else "no retrieval"
        return {"device": str(self.device), "note": f"{why}: nothing profiled", "kernels": []}

    def _summary(self, top: int = 40) -> dict:
        assert self._profile is not None
        wall = time.perf_counter() - self._started
        self._profile.stop()
        spans, per_name, copies = cuda_events(self._profile.events())

        def table(groups: dict[str, list[float]]) -> list[dict]:
            rows = (
                {"name": name[:120], "launches": len(times), "total_ms": round(sum(times) / 1e3, 3),
                 "mean_us": round(sum(times) / len(times), 2)}
                for name, times in groups.items()
            )  # fmt: skip
            return sorted(rows, key=lambda r: -r["total_ms"])

        rows = table(per_name)
        return {
            "device": str(self.device),
            "wall_s": round(wall, 3),
            "busy_ms": round(union_length(spans) / 1e3, 3),
            "kernel_ms": round(sum(sum(times) for times in per_name.values()) / 1e3, 3),
            "launches": sum(r["launches"] for r in rows),
            "busy_ms_per_s": [round(us / 1e3, 2) for us in busy_per_bucket(spans, 1e6)],
            "kernels": rows[:top],
            "copies": table(copies),
        }
