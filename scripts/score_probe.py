"""How long louiskv's unit scoring (`_score_kernel`, kernels.score_units) takes on a GPU over a
unit table stored in bf16 (the layout's dtype) against float8 e4m3 (the daemon's
unit_reps_dtype fp8), at one Llama-3-8B-shaped session (256 rows: 32 layers x 8 KV heads,
4 query heads a row, head_dim 128) and eight (2,048 rows), 2,048 and 8,192 units a row (32K and
128K tokens at 16 a cluster). Random values; the table's bytes over the median time (CUDA
events, kvrecall.bench.common.time_fn) against the device-to-device copy bandwidth measured
here, for each (units a program, warps) in VARIANTS (unit_scores_triton.SCORE_BLOCKS, by the
reps' element size); the scores checked against the reference on the same values. A probe, not
a test.

    python scripts/score_probe.py [--iters 30] [--out F]
"""

from __future__ import annotations

import torch

import kvrecall.kernels as K
from kvrecall.bench.common import gbps, probe_args, time_fn, write_probe
from kvrecall.kernels import unit_scores_triton

VARIANTS = ((64, 4), (128, 4), (128, 8), (256, 8))


def copy_gbps(device: torch.device) -> float:
    """A 2 GiB device-to-device copy: bytes read plus written over its median time."""
    src = torch.randn(1 << 29, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, reps=10).median_ms
    return gbps(2 * src.numel() * 4, ms)


def main() -> None:
    args = probe_args(__doc__)
    device = torch.device("cuda")
    ceiling = copy_gbps(device)
    rows_out = []
    for rows in (256, 2048):
        for units in (2048, 8192):
            g = torch.Generator(device=device).manual_seed(rows + units)
            query = torch.randn(rows, 4, 128, device=device, generator=g).to(torch.bfloat16)
            table = 3 * torch.randn(rows, units, 128, device=device, generator=g)
            valid = torch.rand(rows, units, device=device, generator=g) > 0.05
            row = {"rows": rows, "units": units}
            for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
                reps = table.to(dtype)
                size = reps.element_size()
                default = unit_scores_triton.SCORE_BLOCKS[size]
                want = K.score_units(query, reps.float(), valid, "max", impl="reference")
                fin = torch.isfinite(want)
                for block_u, warps in VARIANTS:
                    unit_scores_triton.SCORE_BLOCKS[size] = (block_u, warps)
                    key = f"{name}_u{block_u}w{warps}"
                    ms = time_fn(lambda r=reps, q=query, v=valid: K.score_units(q, r, v, "max", impl="triton"), device,
                                 reps=args.iters).median_ms  # fmt: skip
                    row[f"{key}_ms"] = round(ms, 4)
                    row[f"{key}_gbps"] = round(gbps(reps.numel() * size, ms), 1)
                    got = K.score_units(query, reps, valid, "max", impl="triton")
                    err = ((got - want)[fin].abs().max() / want[fin].abs().max()).item()
                    row[f"{key}_max_rel_err"] = float(err)
                unit_scores_triton.SCORE_BLOCKS[size] = default
                del reps
            rows_out.append(row)
    print(f"copy bandwidth {ceiling:.0f} GB/s (read + write); ms (GB/s) per (units a program, warps)")
    print(f"{'rows':>5} {'units':>6} {'dtype':>5} " + " ".join(f"{f'u{u}w{w}':>16}" for u, w in VARIANTS))
    for r in rows_out:
        for name in ("bf16", "fp8"):
            cells = [f"{r[f'{name}_u{u}w{w}_ms']:>7} ({r[f'{name}_u{u}w{w}_gbps']:>6})" for u, w in VARIANTS]
            print(f"{r['rows']:>5} {r['units']:>6} {name:>5} " + " ".join(cells))
    worst = max(v for r in rows_out for k, v in r.items() if k.endswith("max_rel_err"))
    print(f"largest relative error against the reference: {worst:.1e}")
    write_probe(args.out, device, "scripts/score_probe.py", rows_out, copy_gbps=round(ceiling, 1))

if __name__ == "__main__":
    main()
