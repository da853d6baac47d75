"""How long the interpreter's cyclic collections stop a worker with an embedded daemon, with and
without `gc_freeze` (kvrecall/gcfreeze.py): `kvrecall bench e2e --daemon embedded` run twice
(--gc-freeze off / on) with a `gc.callbacks` hook timing every collection of the process over
the whole run (setup, steps, teardown, the bench's own gc.collect() calls included) beside the
rows' `gc_collections` (the timed steps only); then one full collection of this process timed
directly, its objects as they are and frozen. Prints a table and writes JSON. Not a test: a probe.

    python scripts/gc_pause_probe.py [--out F] [-- BENCH-E2E-ARGS]
    (default bench: --device cpu --shape tiny --parts many --many 16 --many-context 2048 --rates 0.117
     --steps 48 --warmup 8)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time

from kvrecall.bench import e2e

DEFAULT = ["--device", "cpu", "--shape", "tiny", "--parts", "many", "--many", "16", "--many-context", "2048",
           "--rates", "0.117", "--steps", "48", "--warmup", "8"]  # fmt: skip


class Log:
    """Every collection of the process while hooked: (generation, ms)."""

    def __init__(self) -> None:
        self.passes: list[tuple[int, float]] = []
        self._started = 0.0

    def hook(self, event: str, info: dict) -> None:
        if event == "start":
            self._started = time.perf_counter()
        else:
            self.passes.append((int(info["generation"]), (time.perf_counter() - self._started) * 1e3))

    def summary(self) -> dict:
        out = {}
        for generation in range(3):
            ms = sorted(m for g, m in self.passes if g == generation)
            out[f"run_gen{generation}"] = {
                "count": len(ms), "median_ms": round(ms[len(ms) // 2], 3) if ms else None,
                "max_ms": round(ms[-1], 3) if ms else None,
            }  # fmt: skip
        return out


def full_pass_ms(frozen: bool) -> float:
    """One gc.collect() of this process, its objects frozen first or not (the median of 5)."""
    if frozen:
        gc.freeze()
    try:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            gc.collect()
            times.append((time.perf_counter() - t0) * 1e3)
        return round(sorted(times)[2], 3)
    finally:
        if frozen:
            gc.unfreeze()


def run(freeze: str, bench: list[str]) -> dict:
    log = Log()
    gc.callbacks.append(log.hook)
    out = os.path.join(tempfile.mkdtemp(prefix="gc-probe-"), "e2e.json")
    try:
        code = e2e.main([*bench, "--daemon", "embedded", "--gc-freeze", freeze, "--out", out])
    finally:
        gc.callbacks.remove(log.hook)
    rows = json.load(open(out))["rows"]
    return {"gc_freeze": freeze, "exit": code,
            "timed_steps": [{k: r.get(k) for k in ("rate", "mean_ms", "gc_collections", "gc_pause_ms_max",
                                                   "gc_full_ms_total")} for r in rows],
            **log.summary()}  # fmt: skip


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv[:split])
    bench = argv[split + 1 :] or DEFAULT
    results = [run(freeze, bench) for freeze in ("off", "on")]
    direct = {"tracked_objects": len(gc.get_objects()), "full_pass_ms": full_pass_ms(False),
              "full_pass_ms_frozen": full_pass_ms(True)}  # fmt: skip
    print("whole run (setup, steps, teardown):")
    print(f"{'gc_freeze':>9} {'gen':>3} {'count':>5} {'median ms':>10} {'max ms':>8}")
    for r in results:
        for generation in range(3):
            s = r[f"run_gen{generation}"]
            print(f"{r['gc_freeze']:>9} {generation:>3} {s['count']:>5} {s['median_ms'] or '-':>10} {s['max_ms'] or '-':>8}")
    print("timed steps (rows' gc_collections per generation, longest pause):")
    for r in results:
        print(f"  gc_freeze {r['gc_freeze']}: " + "; ".join(
            f"rate {t['rate']}: {t['gc_collections']}, {t['gc_pause_ms_max']} ms" for t in r["timed_steps"]))
    print(f"one full collection of this process ({direct['tracked_objects']} objects): {direct['full_pass_ms']} ms, "
          f"frozen {direct['full_pass_ms_frozen']} ms")
    if args.out:
        meta = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": "python scripts/gc_pause_probe.py " + " ".join(sys.argv[1:]), "host": platform.node(),
                "cpus": os.cpu_count(), "python": platform.python_version(), "bench": bench}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "runs": results, "direct": direct}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
