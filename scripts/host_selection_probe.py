"""Can the daemon choose louiskv's units on the host in time? (DEVELOPERS.md, "the next lever".)

A Llama-3-8B-shaped unit table (32 layers x 8 KV heads = 256 rows, ~context / 16 units of random
sizes around 16 tokens, the candidates grouped by unit) and one boundary's queries (4 per row),
on CPU tensors: `louiskv.choose_units` as the daemon runs it on a CPU (the references) against a
host-shaped version of the same choice (the daemon's `host_selection.choose_on_host`: the scores
as one batched matmul over the f32 table, a top-k of the units instead of a sort of them all,
widened until it fills the budget, then the chosen units' candidates gathered by their offsets),
and the placement's plan (`reference.plan_region`) against the choice of a nearby query. Both
answers compared (the same positions per row, as sets); each timed (median of --iters). Prints a
table and writes JSON. Not a test: a probe of host time, the time an answer would wait.

    python scripts/host_selection_probe.py [--contexts 32768,131072] [--threads 0] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import time

import torch

from kvrecall.kernels.reference import plan_region
from kvrecall.server.host_selection import choose_on_host
from kvrecall.server.policies.louiskv import choose_units

ROWS = 32 * 8  # layers x KV heads of Llama-3-8B
GROUP, DIM = 4, 128


def table(context: int, seed: int = 0):
    """reps [R, U, D] f32, valid, sizes [R, U] int32, position [R, M] int32 (grouped by unit), q [R, G, D]."""
    g = torch.Generator().manual_seed(seed)
    units = context // 16
    sizes = torch.randint(8, 25, (ROWS, units), generator=g, dtype=torch.int32)
    total = int(sizes.sum(dim=1).max())
    position = torch.stack([torch.randperm(total, generator=g)[:total] for _ in range(ROWS)]).to(torch.int32)
    reps = torch.randn(ROWS, units, DIM, generator=g)
    q = torch.randn(ROWS, GROUP, DIM, generator=g)
    return reps, sizes > 0, sizes, position, q


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--pinned", type=int, default=256, help="pinned tokens per row (louiskv: pin_ingest x budget)")
    p.add_argument("--out", default="host-selection-probe.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'context':>8} {'units':>6} {'reference ms':>13} {'host ms':>8} {'plan ms':>8} {'same':>5}")
    for context in [int(c) for c in args.contexts.split(",") if c]:
        reps, valid, sizes, position, q = table(context)
        pinned = None
        if args.pinned:
            g = torch.Generator().manual_seed(1)
            pinned = torch.stack([torch.randperm(context, generator=g)[: args.pinned] for _ in range(ROWS)])
            pinned = pinned.sort(dim=1).values
        reference = choose_units(q, reps, valid, sizes, position, pinned, args.budget, "max")[0]
        host = choose_on_host(q, reps, valid, sizes, position, pinned, args.budget, "max")[0]
        same = bool((reference.sort(dim=1).values == host.sort(dim=1).values).all())
        reference_run = functools.partial(choose_units, q, reps, valid, sizes, position, pinned, args.budget, "max")
        host_run = functools.partial(choose_on_host, q, reps, valid, sizes, position, pinned, args.budget, "max")
        # The placement's plan against a region holding the choice of a query moved 0.15 of the way
        g = torch.Generator().manual_seed(2)
        before = choose_on_host(q + 3 * torch.randn(q.shape, generator=g), reps, valid, sizes, position, pinned,
                                args.budget, "max")[0]  # fmt: skip
        plan_run = functools.partial(plan_region, before, host, context + 1024)
        row = {
            "context": context, "units": reps.shape[1], "budget": args.budget, "pinned": args.pinned,
            "same_choice": same,
            "reference_ms": median_ms(reference_run, args.iters), "host_ms": median_ms(host_run, args.iters),
            "plan_ms": median_ms(plan_run, args.iters),
        }  # fmt: skip
        rows.append(row)
        print(f"{context:>8} {row['units']:>6} {row['reference_ms']:>13} {row['host_ms']:>8} {row['plan_ms']:>8} "
              f"{str(same):>5}")
    meta = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
