"""How long louiskv's greedy selection under a budget takes on a GPU for rows longer than the
selection kernel's block (budget_triton.MAX_UNITS units: 64K prompt tokens at 16 a cluster):
the chunked kernel (its search 2, 4 and 16 ways a pass: budget_triton.SEARCH_WAYS) against the
PyTorch reference (sort, gather, scan, scatter) it replaced there, at 256 rows (one
Llama-3-8B-shaped session: 32 layers x 8 KV heads) and 2,048 (eight), 8,192 and 16,384 units
(128K and 256K tokens), budget 1024. Random scores, sizes 1-31; CUDA events
(kvrecall.bench.common.time_fn), median of --iters; results checked equal. Prints a table and
writes JSON. A probe, not a test.

    python scripts/select_probe.py [--iters 30] [--out F]
"""

from __future__ import annotations

import torch

import kvrecall.kernels as K
from kvrecall.bench.common import probe_args, time_fn, write_probe
from kvrecall.kernels import budget_triton


def main() -> None:
    args = probe_args(__doc__)
    device = torch.device("cuda")
    rows_out = []
    default_ways = budget_triton.SEARCH_WAYS
    for rows in (256, 2048):
        for units in (8192, 16384):
            scores = torch.randn(rows, units, device=device)
            sizes = torch.randint(1, 32, (rows, units), device=device, dtype=torch.int32)
            row = {"rows": rows, "units": units}
            want = K.select_under_budget(scores, sizes, 1024, impl="reference")
            for ways in (2, 4, 16):
                budget_triton.SEARCH_WAYS = ways
                row[f"kernel_{ways}way_ms"] = round(time_fn(
                    lambda s=scores, z=sizes: K.select_under_budget(s, z, 1024, impl="triton"), device,
                    reps=args.iters).median_ms, 4)
                row[f"same_{ways}way"] = bool(torch.equal(K.select_under_budget(scores, sizes, 1024, impl="triton"), want))
            budget_triton.SEARCH_WAYS = default_ways
            row["reference_ms"] = round(time_fn(
                lambda s=scores, z=sizes: K.select_under_budget(s, z, 1024, impl="reference"), device,
                reps=args.iters).median_ms, 4)
            rows_out.append(row)
    print(f"{'rows':>5} {'units':>6} {'2-way ms':>9} {'4-way ms':>9} {'16-way ms':>10} {'reference ms':>13} same")
    for r in rows_out:
        same = all(r[f"same_{w}way"] for w in (2, 4, 16))
        print(f"{r['rows']:>5} {r['units']:>6} {r['kernel_2way_ms']:>9} {r['kernel_4way_ms']:>9} "
              f"{r['kernel_16way_ms']:>10} {r['reference_ms']:>13} {same}")  # fmt: skip
    write_probe(args.out, device, "scripts/select_probe.py", rows_out)

if __name__ == "__main__":
    main()
