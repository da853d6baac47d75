"""Where the daemon's host time goes in a Boundaries call: `kvrecall bench e2e --daemon embedded`
with every `step_batch.serve_step` call timed by function (TIMED below: each call's wall time and
its thread's CPU time, counted only on the daemon's serving thread, inclusive of what it calls;
wall minus CPU is time the thread slept: the interpreter lock, a lock, an I/O wait) and, with
--count-ops, each call's aten ops counted by phase and by name (a TorchDispatchMode on the daemon's
thread: on CUDA an op is at least one launch and ~5-10 us of host time). Split by kind of call:
notices alone, or with retrievals. The daemon runs embedded so its thread is this process's; the
work is the same as a daemon process's. (cProfile cannot do this on Python 3.12: it profiles every
thread, the worker's too.) Not a test: a diagnostic. Prints the tables and writes them as JSON.

    python scripts/serve_step_profile.py [--count-ops] [--profile-out F] -- BENCH-E2E-ARGS...
    e.g. -- --device cuda --parts many --many 64 --rates 0.117 --steps 48 --out /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import sys
import threading
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvrecall import phases
from kvrecall.bench import e2e
from kvrecall.server import service, step_batch, warmup

# What is timed: "module:attribute" or "module:Class.method" (patched where they are looked up).
TIMED = (
    "kvrecall.server.step_batch:append_together", "kvrecall.server.step_batch:_place_fills",
    "kvrecall.server.step_batch:_place", "kvrecall.server.session:Session.begin_append",
    "kvrecall.server.session:Session.end_append", "kvrecall.server.session:Session.begin_boundary",
    "kvrecall.server.session:Session.finish", "kvrecall.server.session:Session.context",
    "kvrecall.server.working_set:WorkingSet.spill_evict_together",
    "kvrecall.server.working_set:WorkingSet.set_retrieved_together",
    "kvrecall.server.working_set:WorkingSet.kernel_part", "kvrecall:kernels.spill_evict_many",
    "kvrecall.kernels.notice_triton:spill_evict_many_triton", "kvrecall:kernels.place_retrieved_many",
    "kvrecall.server.policies.louiskv:LouisKVPolicy.on_evict_many",
    "kvrecall.server.policies.louiskv:LouisKVPolicy.on_boundaries",
    "kvrecall.server.policies.louiskv:close_segments", "kvrecall.server.policies.louiskv:fill_free_slots",
    "kvrecall.server.policies.louiskv:select_together", "kvrecall.server.policies.louiskv:_append_segments",
    "kvrecall.server.policies.louiskv:LouisKVPolicy._choose_every_layer",
    "kvrecall.server.policies.louiskv:LouisKVPolicy._choose_captured", "kvrecall.server.policies.louiskv:choose_units",
    "kvrecall:kernels.score_units", "kvrecall:kernels.select_under_budget", "kvrecall:kernels.expand_grouped",
    "kvrecall:kernels.expand_pinned", "kvrecall.kernels.placement_triton:place_retrieved_many_triton",
    "kvrecall.kernels.placement_triton:_launch_place", "kvrecall.kernels.placement_triton:copy_staged",
    "kvrecall.kernels.placement_staged:gather_upload", "kvrecall.server.working_set:to_device",
    "kvrecall.launch_gate:release", "kvrecall.server.step_batch:check_events",
    "torch:Tensor.item", "torch:Tensor.tolist", "torch:Tensor.pin_memory", "torch:_foreach_add_",
    "torch.cuda:Stream.synchronize", "torch.cuda:Event.synchronize", "torch.cuda:current_stream",
)  # fmt: skip

_local = threading.local()


class _Counter(TorchDispatchMode):
    def __init__(self, names: collections.Counter) -> None:
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        _local.ops += 1
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class Profile:
    """serve_step wrapped: per-function wall / CPU time and (optionally) op counts per kind of call."""

    def __init__(self, count_ops: bool) -> None:
        self.count_ops = count_ops
        self.calls: collections.Counter = collections.Counter()
        self.sessions: collections.Counter = collections.Counter()
        self.wall: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.cpu: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.count: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.phase_ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.op_names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def _timed(self, name: str, fn):
        profile = self

        @functools.wraps(fn)
        def run(*args, **kwargs):
            kind = getattr(_local, "kind", None)
            if kind is None:
                return fn(*args, **kwargs)
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                profile.wall[kind][name] += time.perf_counter() - wall
                profile.cpu[kind][name] += time.thread_time() - cpu
                profile.count[kind][name] += 1

        return run

    def _patch(self, target: str) -> None:
        module_name, path = target.split(":")
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        if isinstance(raw, classmethod):
            setattr(owner, attr, classmethod(self._timed(path, raw.__func__)))
        elif isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(self._timed(path, raw.__func__)))
        else:
            setattr(owner, attr, self._timed(path, getattr(owner, attr)))

    def install(self) -> None:
        for target in TIMED:
            self._patch(target)
        original = step_batch.serve_step
        original_mark = phases.PhaseClock.mark
        profile = self

        def mark(clock, name):
            kind = getattr(_local, "kind", None)
            if kind is not None and profile.count_ops:
                profile.phase_ops[kind][name] += _local.ops - _local.last
                _local.last = _local.ops
            original_mark(clock, name)

        def serve_step(sessions, events, *args, **kwargs):
            kind = "retrievals" if any(event.retrieve for event in events) else "notices"
            profile.calls[kind] += 1
            profile.sessions[kind] += len(events)
            _local.kind, _local.ops, _local.last = kind, 0, 0
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                if profile.count_ops:
                    with _Counter(profile.op_names[kind]):
                        return original(sessions, events, *args, **kwargs)
                return original(sessions, events, *args, **kwargs)
            finally:
                profile.wall[kind]["serve_step"] += time.perf_counter() - wall
                profile.cpu[kind]["serve_step"] += time.thread_time() - cpu
                profile.count[kind]["serve_step"] += 1
                _local.kind = None

        phases.PhaseClock.mark = mark
        for module in (step_batch, service, warmup):
            module.serve_step = serve_step

    def summary(self, top: int) -> dict:
        out = {}
        for kind, calls in self.calls.items():
            rows = [{"function": name, "calls_per_call": self.count[kind][name] / calls,
                     "wall_ms_per_call": 1e3 * wall / calls, "cpu_ms_per_call": 1e3 * self.cpu[kind][name] / calls}
                    for name, wall in self.wall[kind].items()]  # fmt: skip
            out[kind] = {
                "calls": calls,
                "sessions_per_call": self.sessions[kind] / calls,
                "functions": sorted(rows, key=lambda r: -r["wall_ms_per_call"]),
                "ops_per_call_by_phase": {p: n / calls for p, n in self.phase_ops[kind].items()} if self.count_ops else None,
                "top_ops_per_call": [(n, c / calls) for n, c in self.op_names[kind].most_common(top)] if self.count_ops else None,
            }
        return out


def _print(summary: dict) -> None:
    for kind, s in summary.items():
        print(f"\n== {kind}: {s['calls']} calls, {s['sessions_per_call']:.1f} sessions a call")
        if s["ops_per_call_by_phase"] is not None:
            print("ops a call by phase:", {p: round(n, 1) for p, n in s["ops_per_call_by_phase"].items()})
            print("ops a call by name:", [(n, round(c, 1)) for n, c in s["top_ops_per_call"]])
        print("   wall ms     cpu ms   calls   (a Boundaries call's, inclusive)")
        for r in s["functions"]:
            print(f"  {r['wall_ms_per_call']:8.3f}  {r['cpu_ms_per_call']:8.3f}  {r['calls_per_call']:6.1f}   {r['function']}")


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count-ops", action="store_true")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--profile-out", default=None)
    args = p.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    if "--daemon" not in bench_args:
        bench_args += ["--daemon", "embedded"]
    profile = Profile(args.count_ops)
    profile.install()
    try:
        rc = e2e.main(bench_args)
    finally:
        summary = profile.summary(args.top)
        _print(summary)
        if args.profile_out:
            with open(args.profile_out, "w") as f:
                json.dump({"bench_args": bench_args, "count_ops": args.count_ops, "kinds": summary,
                           "torch": torch.__version__}, f, indent=1)  # fmt: skip
    return rc


if __name__ == "__main__":
    sys.exit(main())
