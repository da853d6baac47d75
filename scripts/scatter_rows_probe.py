"""How long a staged retrieval's rows take to reach their slots on a GPU: two index_copy_ of
8-byte words (the daemon's way before 2026-12-04) against scatter_rows' kernel, at a
Llama-3-8B-shaped session (32 layers x 8 KV heads, 1,120 slots a row, 128 bf16 a row: keys
and values [286,720, 128] each) for 0.1, 0.2 and 0.4 of its 1,024-token budget moved (a
drift-0.15 retrieval moved ~0.2). Times with CUDA events, median of --iters over 4 rotating
sets of targets; the bytes read and written (2 x rows x 256 B, K and V) over that time against
a device-to-device copy of as many bytes. Prints a table and writes JSON. A probe, not a test.

    python scripts/scatter_rows_probe.py [--iters 50] [--out F]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch

from kvrecall.kernels.scatter_rows import scatter_rows

ROWS, SLOTS, D, BUDGET = 32 * 8, 1120, 128, 1024


def timed(fn, iters: int) -> float:
    """Median ms of fn(i) over iters calls (events), after 3 untimed."""
    for i in range(3):
        fn(i)
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(keys: torch.Tensor, values: torch.Tensor, share: float, iters: int) -> dict:
    n = int(ROWS * BUDGET * share)
    rows = torch.randn(2 * n, D, device=keys.device).to(torch.bfloat16)
    targets = [torch.randperm(ROWS * SLOTS, device=keys.device)[:n] for _ in range(4)]
    words = (keys.view(torch.int64), values.view(torch.int64), rows.view(torch.int64))

    def by_index_copy(i: int) -> None:
        where = targets[i % 4]
        words[0].index_copy_(0, where, words[2][:n])
        words[1].index_copy_(0, where, words[2][n:])

    def by_kernel(i: int) -> None:
        scatter_rows(rows, targets[i % 4], keys, values, 0, n, n, impl="triton")

    flat = rows.view(-1)
    copy_to = torch.empty_like(flat)
    ms = {"index_copy": timed(by_index_copy, iters), "kernel": timed(by_kernel, iters),
          "d2d_copy": timed(lambda i: copy_to.copy_(flat), iters)}  # fmt: skip
    # Checked once: the kernel's result equals index_copy_'s.
    want_k, want_v = keys.clone(), values.clone()
    want_k.view(torch.int64).index_copy_(0, targets[0], words[2][:n])
    want_v.view(torch.int64).index_copy_(0, targets[0], words[2][n:])
    scatter_rows(rows, targets[0], keys, values, 0, n, n, impl="triton")
    same = bool(torch.equal(keys, want_k) and torch.equal(values, want_v))
    moved = 2 * n * D * 2  # bytes read (and as many written)
    return {"share": share, "rows": n, "bytes_moved": moved, "ms": ms, "same": same,
            "gb_s": {k: round(2 * moved / v / 1e6, 1) for k, v in ms.items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    keys, values = (torch.randn(ROWS * SLOTS, D, device=device).to(torch.bfloat16) for _ in range(2))
    results = [measure(keys, values, share, args.iters) for share in (0.1, 0.2, 0.4)]
    print(f"{'share':>6} {'rows':>7} {'index_copy ms':>14} {'kernel ms':>10} {'d2d copy ms':>12} {'kernel GB/s':>12} same")
    for r in results:
        print(f"{r['share']:>6} {r['rows']:>7} {r['ms']['index_copy']:>14.4f} {r['ms']['kernel']:>10.4f} "
              f"{r['ms']['d2d_copy']:>12.4f} {r['gb_s']['kernel']:>12} {r['same']}")  # fmt: skip
    out = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "command": "python scripts/scatter_rows_probe.py", "results": results}  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
