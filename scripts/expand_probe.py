"""GPU time of louiskv's expansion (units -> token positions) on a Llama-3-8B-shaped table:
`kernels.expand_selection` (reads every candidate's unit, rank and position) against
`kernels.expand_grouped` (reads the units and the chosen positions; what choose_units runs).
Units of random sizes (mean 16 tokens) grouped by unit, a budget selection on random scores;
both kernels' answers compared, then each timed with CUDA events (median of --iters after a
warm-up). Prints a table and writes JSON. Not a test: a probe of one kernel's cost, the time
a worker on the same GPU loses while the daemon's kernels run.

    python scripts/expand_probe.py [--contexts 32768,131072] [--sessions 1,8] [--budget 1024] [--out F]
    python scripts/expand_probe.py --tiny   # CPU, Triton's interpreter (TRITON_INTERPRET=1): does it run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys

import torch

ROWS_PER_SESSION = 32 * 8  # layers x KV heads of Llama-3-8B


def table(rows: int, context: int, budget: int, device: torch.device, seed: int = 0):
    """take, sizes [rows, U]; unit, rank, position [rows, context] int32, grouped by unit."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    units = max(1, context // 16)
    sizes = torch.multinomial(torch.ones(units), context, replacement=True, generator=g)
    sizes = torch.bincount(sizes, minlength=units).int().expand(rows, -1).contiguous()
    unit = torch.repeat_interleave(torch.arange(units), sizes[0].long()).int().expand(rows, -1).contiguous()
    start = (sizes[0].cumsum(0) - sizes[0]).long()
    rank = (torch.arange(context) - start[unit[0].long()]).int().expand(rows, -1).contiguous()
    position = torch.rand(rows, context, generator=g).argsort(dim=1).int()
    scores = torch.randn(rows, units, generator=g)
    moved = [t.to(device) for t in (scores, sizes, unit, rank, position)]
    from kvrecall import kernels

    take = kernels.select_under_budget(moved[0], moved[1], budget)
    return take, *moved[1:]


def timed(fn, iters: int, device: torch.device) -> float:
    """Median microseconds of fn() (CUDA events; wall clock on CPU)."""
    import time

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(1e3 * start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--sessions", default="1,8")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="CPU under Triton's interpreter, tiny sizes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
    from kvrecall import kernels

    device = torch.device("cpu" if args.tiny else "cuda")
    rows_per = 4 if args.tiny else ROWS_PER_SESSION
    contexts = [256] if args.tiny else [int(c) for c in args.contexts.split(",")]
    budget = 32 if args.tiny else args.budget
    iters = 2 if args.tiny else args.iters
    rows_out = []
    for context in contexts:
        for sessions in [int(s) for s in args.sessions.split(",")]:
            take, sizes, unit, rank, position = table(sessions * rows_per, context, budget, device)
            old = kernels.expand_selection(take, unit, rank, position, budget, impl="triton")
            new = kernels.expand_grouped(take, sizes, position, budget, impl="triton")
            row = {
                "context": context, "sessions": sessions, "rows": sessions * rows_per, "units": sizes.shape[1],
                "budget": budget, "equal": bool(torch.equal(old, new)),
                "expand_selection_us": round(timed(functools.partial(
                    kernels.expand_selection, take, unit, rank, position, budget, impl="triton"), iters, device), 1),
                "expand_grouped_us": round(timed(functools.partial(
                    kernels.expand_grouped, take, sizes, position, budget, impl="triton"), iters, device), 1),
            }  # fmt: skip
            row["ratio"] = round(row["expand_selection_us"] / max(row["expand_grouped_us"], 1e-9), 2)
            rows_out.append(row)
    print(f"{'context':>8} {'sessions':>8} {'rows':>6} {'units':>6} {'equal':>5} {'selection us':>12} {'grouped us':>10} {'ratio':>6}")
    for r in rows_out:
        print(f"{r['context']:>8} {r['sessions']:>8} {r['rows']:>6} {r['units']:>6} {str(r['equal']):>5} "
              f"{r['expand_selection_us']:>12} {r['expand_grouped_us']:>10} {r['ratio']:>6}")  # fmt: skip
    if args.out:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        }  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows_out}, f, indent=2)
    return 0 if all(r["equal"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
