"""How long the host's placement plan (kernels.reference.plan_region: host_selection and
worker_selection_place=host) takes by `_members`' membership map against its sort, at a
Llama-3-8B-shaped region (256 rows, budget 1024, ~80% of the region kept) over 32K, 128K and
256K positions. Median of --iters; prints a table and writes JSON. A probe, not a test.

    python scripts/plan_region_probe.py [--iters 21] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

from kvrecall.kernels import reference

ROWS, BUDGET, KEPT = 256, 1024, 820


def median_ms(current: torch.Tensor, selection: torch.Tensor, n: int, iters: int) -> float:
    """plan_region's median time over `iters` calls (after one untimed)."""
    reference.plan_region(current, selection, n)
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        reference.plan_region(current, selection, n)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e3, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=21)
    p.add_argument("--out", default="plan-region-probe.json")
    args = p.parse_args()
    torch.manual_seed(0)
    rows, default = [], reference.MAP_SPAN
    try:
        for n in (33024, 131328, 262400):
            current = torch.stack([torch.randperm(n)[:BUDGET] for _ in range(ROWS)])
            fresh = torch.stack([torch.randperm(n)[: BUDGET - KEPT] for _ in range(ROWS)])
            selection = torch.cat((current[:, :KEPT], fresh), dim=1)
            row = {"positions": n}
            for how, span in (("map", 1 << 30), ("sort", 0)):
                reference.MAP_SPAN = span
                row[f"{how}_ms"] = median_ms(current, selection, n, args.iters)
            reference.MAP_SPAN = default
            row["default"] = "map" if n <= default * BUDGET else "sort"
            rows.append(row)
            print(f"{n:>8} positions: map {row['map_ms']:7.2f} ms, sort {row['sort_ms']:7.2f} ms (MAP_SPAN={default}: "
                  f"{row['default']})", flush=True)
    finally:
        reference.MAP_SPAN = default
    doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "host": platform.node(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
