"""How fast the daemon's host gather (kernels/placement_staged.py: torch.index_select of
256-byte rows from the pinned pool into staging) runs on this host, by torch thread count, and
split over Python threads (index_select releases the interpreter lock).

    python scripts/host_gather_probe.py --out FILE [--pool-gib 8] [--rows 65536] [--pools torch,pinned4k,pinnedhuge]

Pools: `torch` (torch.ones, what the first version of this probe measured), `pinned4k` / `pinnedhuge`
(the daemon's host tier: server/pinned.py's PinnedBuffer, an anonymous mapping registered with
CUDA, without and with MADV_HUGEPAGE; pinned ones need a GPU). A tier of tens of GiB over 4 KiB
pages has page tables no cache holds: --pool-gib 40 is the bench's tier.

Rows: uniformly random over the pool, or runs of 16 consecutive rows (a cluster's tokens of
one head in a page); each timed gather reads rows of its own (`fresh`, the default: the rows
come from DRAM as a retrieval's do) or the same rows every time (`--same-rows`: after the first
gather they sit in the host's last-level cache; the 2026-12-01 probe measured so). Prints a
table and writes JSON with the date, host and command.
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
    """Seconds per call of func(k) for k = 1..repeats, after an untimed func(0)."""
    func(0)
    started = time.perf_counter()
    for k in range(1, repeats + 1):
        func(k)
    return (time.perf_counter() - started) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-gib", type=float, default=8.0)
    p.add_argument("--rows", type=int, default=65536, help="rows per gather (one staging chunk)")
    p.add_argument("--pools", default="torch", help="comma-separated: torch, pinned4k, pinnedhuge")
    p.add_argument("--threads", default="", help="torch thread counts to time (default 1, 2, 4, 8, 16, all)")
    p.add_argument("--same-rows", action="store_true", help="every timed gather reads the same rows (cache-warm)")
    p.add_argument("--python-threads", default="4,8,16", help="Python thread counts to time (empty: none)")
    p.add_argument("--out", default="host-gather.json")
    args = p.parse_args()
    rows_in_pool = int(args.pool_gib * 2**30) // 256
    results = []
    for kind in args.pools.split(","):
        if kind == "torch":
            results += probe(torch.ones((rows_in_pool, 128), dtype=torch.int16), kind, args)
            continue
        from kvrecall.server.pinned import PinnedBuffer, thp_mode

        buffer = PinnedBuffer(rows_in_pool * 256, hugepages=kind == "pinnedhuge")
        print(f"{kind}: huge pages advised {buffer.hugepages}, transparent huge pages {thp_mode()}, "
              f"AnonHugePages {anon_huge_kib()} KiB")  # fmt: skip
        results += probe(buffer.tensor.view(torch.int16).view(rows_in_pool, 128), kind, args)
        buffer.release()
    for r in results:
        print(f"{r['pool']:10s} {r['rows']:8s} {r['how']:24s} {r['threads']:3d}  {r['ms']:8.2f} ms  {r['gib_s']:6.2f} GiB/s")
    doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "cpus": os.cpu_count(), "torch": torch.__version__, "pool_gib": args.pool_gib,
           "mib_per_gather": args.rows * 256 / 2**20, "same_rows": args.same_rows, "results": results}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


def anon_huge_kib() -> int:
    """This process's AnonHugePages (KiB), from /proc/self/smaps_rollup (0 where unreadable)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def probe(pool: torch.Tensor, kind: str, args: argparse.Namespace) -> list[dict]:
    rows_in_pool = pool.shape[0]
    g = torch.Generator().manual_seed(0)
    draws = 1 if args.same_rows else 6  # timed() calls func(0..5)
    sets = {
        "random": [torch.randint(0, rows_in_pool, (args.rows,), generator=g) for _ in range(draws)],
        "runs16": [((torch.randint(0, rows_in_pool // 16, (args.rows // 16,), generator=g) * 16)[:, None]
                    + torch.arange(16)).flatten() for _ in range(draws)],  # fmt: skip
    }
    out = torch.empty((args.rows, 128), dtype=torch.int16)
    mib = args.rows * 256 / 2**20
    results = []
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, 2, 4, 8, 16, cores})
    for name, index in sets.items():
        for threads in [t for t in counts if 1 <= t <= cores]:
            torch.set_num_threads(threads)
            seconds = timed(lambda k, index=index: torch.index_select(pool, 0, index[k % len(index)], out=out))
            results.append({"pool": kind, "rows": name, "how": "torch threads", "threads": threads, "ms": round(seconds * 1e3, 3),
                            "gib_s": round(mib / 1024 / seconds, 2)})  # fmt: skip
        torch.set_num_threads(1)
        for workers in [int(t) for t in args.python_threads.split(",") if t]:
            parts = [(lo, min(lo + -(-args.rows // workers), args.rows)) for lo in range(0, args.rows, -(-args.rows // workers))]
            with ThreadPoolExecutor(workers) as ex:

                def split(k, index=index, parts=parts, ex=ex):
                    rows = index[k % len(index)]
                    list(ex.map(lambda r: torch.index_select(pool, 0, rows[r[0] : r[1]], out=out[r[0] : r[1]]), parts))

                seconds = timed(split)
            results.append({"pool": kind, "rows": name, "how": "python threads, torch 1", "threads": workers,
                            "ms": round(seconds * 1e3, 3), "gib_s": round(mib / 1024 / seconds, 2)})  # fmt: skip
    torch.set_num_threads(cores)
    return results


if __name__ == "__main__":
    sys.exit(main())
