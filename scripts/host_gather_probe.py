"""How fast the daemon's host gather (kernels/placement_staged.py: torch.index_select of
256-byte rows from the pinned pool into staging) runs on this host, by torch thread count, and
split over Python threads (index_select releases the interpreter lock).

    python scripts/host_gather_probe.py --out FILE [--pool-gib 8] [--rows 65536]

Rows: uniformly random over the pool, or runs of 16 consecutive rows (a cluster's tokens of
one head in a page). Prints a table and writes JSON with the date, host and command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import torch


def timed(func, repeats: int = 5) -> float:
    func()
    started = time.perf_counter()
    for _ in range(repeats):
        func()
    return (time.perf_counter() - started) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-gib", type=float, default=8.0)
    p.add_argument("--rows", type=int, default=65536, help="rows per gather (one staging chunk)")
    p.add_argument("--out", default="host-gather.json")
    args = p.parse_args()
    rows_in_pool = int(args.pool_gib * 2**30) // 256
    pool = torch.ones((rows_in_pool, 128), dtype=torch.int16)
    g = torch.Generator().manual_seed(0)
    sets = {
        "random": torch.randint(0, rows_in_pool, (args.rows,), generator=g),
        "runs16": ((torch.randint(0, rows_in_pool // 16, (args.rows // 16,), generator=g) * 16)[:, None]
                   + torch.arange(16)).flatten(),  # fmt: skip
    }
    out = torch.empty((args.rows, 128), dtype=torch.int16)
    mib = args.rows * 256 / 2**20
    results = []
    cores = os.cpu_count() or 1
    for name, index in sets.items():
        for threads in sorted({1, 2, 4, 8, 16, cores} & set(range(1, cores + 1))):
            torch.set_num_threads(threads)
            seconds = timed(lambda index=index: torch.index_select(pool, 0, index, out=out))
            results.append({"rows": name, "how": "torch threads", "threads": threads, "ms": round(seconds * 1e3, 3),
                            "gib_s": round(mib / 1024 / seconds, 2)})  # fmt: skip
        torch.set_num_threads(1)
        for workers in (4, 8, 16):
            parts = [(lo, min(lo + -(-args.rows // workers), args.rows)) for lo in range(0, args.rows, -(-args.rows // workers))]
            with ThreadPoolExecutor(workers) as ex:

                def split(index=index, parts=parts, ex=ex):
                    list(ex.map(lambda r: torch.index_select(pool, 0, index[r[0] : r[1]], out=out[r[0] : r[1]]), parts))

                seconds = timed(split)
            results.append({"rows": name, "how": "python threads, torch 1", "threads": workers,
                            "ms": round(seconds * 1e3, 3), "gib_s": round(mib / 1024 / seconds, 2)})  # fmt: skip
    for r in results:
        print(f"{r['rows']:8s} {r['how']:24s} {r['threads']:3d}  {r['ms']:8.2f} ms  {r['gib_s']:6.2f} GiB/s")
    doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "cpus": cores, "torch": torch.__version__, "mib_per_gather": mib, "results": results}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
