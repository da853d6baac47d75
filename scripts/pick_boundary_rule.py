"""Pick louiskv's boundary rule from a louiskv_sweep.py result (the rule docs/TUNING.md states).

Per (signal, threshold, max_segment): mean top-1 agreement, mean KL and mean boundary rate over
the sweep's cases. The reference is retrieving on every step (threshold 1). Chosen: the lowest
rate whose agreement is within `--tolerance` of the reference and whose rate is at most
`--max-rate`; ties go to the lower KL. When nothing qualifies, the best agreement at a rate
<= `--max-rate`.

    python scripts/pick_boundary_rule.py bench/results/louiskv-sweep.json --out rule.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["signal"], r["threshold"], r["max_segment"])].append(r)
    table = []
    for (signal, threshold, max_segment), rs in sorted(groups.items()):
        n = len(rs)
        table.append(
            {
                "signal": signal,
                "threshold": threshold,
                "max_segment": max_segment,
                "top1": round(sum(r["top1"] for r in rs) / n, 4),
                "kl": round(sum(r["kl"] for r in rs) / n, 5),
                "rate": round(sum(r["rate"] for r in rs) / n, 4),
                "cases": n,
            }
        )
    return table


def pick(table: list[dict], tolerance: float, max_rate: float) -> tuple[dict, dict]:
    reference = max((t for t in table if t["threshold"] >= 1.0), key=lambda t: t["top1"])
    tuned = [t for t in table if -1.0 < t["threshold"] < 1.0 and t["rate"] <= max_rate]
    good = [t for t in tuned if t["top1"] >= reference["top1"] - tolerance]
    if good:
        chosen = min(good, key=lambda t: (t["rate"], t["kl"]))
    else:
        chosen = max(tuned, key=lambda t: (t["top1"], -t["kl"]))
    return chosen, reference


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", nargs="+", help="louiskv_sweep.py JSON files (shards are merged)")
    ap.add_argument("--tolerance", type=float, default=0.005)
    ap.add_argument("--max-rate", type=float, default=0.2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for path in args.sweep:
        with open(path) as fh:
            rows += json.load(fh)["rows"]
    table = summarise(rows)
    whole = max(t["cases"] for t in table)
    table = [t for t in table if t["cases"] == whole]  # a shard cut short leaves partial configurations
    chosen, reference = pick(table, args.tolerance, args.max_rate)
    for t in table:
        mark = " <- chosen" if t is chosen else (" (every step)" if t is reference else "")
        print(
            f"{t['signal']:4s} th={t['threshold']:5.2f} seg={t['max_segment']:3d} "
            f"top1={t['top1']:.4f} kl={t['kl']:.4f} rate={t['rate']:.3f}{mark}"
        )
    config = {
        "threshold": chosen["threshold"],
        "max_segment": chosen["max_segment"],
        "pre_rope": chosen["signal"] == "pre",
    }
    result = {"config": config, "chosen": chosen, "every_step": reference, "table": table}
    print(json.dumps({"config": config}))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
