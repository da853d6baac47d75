"""Render README's performance table from a committed `kvrecall bench e2e` JSON, so text and
numbers cannot drift: `python -m kvrecall.bench.readme bench/results/<run>-e2e.json` rewrites
the block between the README's perf markers; tests check the block equals the rendering."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- perf:start (python -m kvrecall.bench.readme) -->", "<!-- perf:end -->"
MEASURED_RATE = 0.117


def _row(rows: list[dict[str, Any]], policy: str, context: int, batch: int, rate: float | None = None):
    for r in rows:
        if r["part"] == "step" and (r["policy"], r["context"], r["batch"]) == (policy, context, batch):
            if rate is None or r["rate"] == rate:
                return r
    return None


def render(result: dict[str, Any], source: str) -> str:
    rows, meta = result["rows"], result["meta"]
    configs = sorted({(r["context"], r["batch"]) for r in rows if r["part"] == "step"})
    lines = [
        f"Measured by `{meta['command']}` on {meta.get('device')} ({meta['date_utc'][:10]}; "
        f"`{source}`, plot beside it). Llama-3-8B shape, random bf16 weights, budget 1024; every step "
        "graph-captured; kvrecall steps timed on the host around `Engine.step()` (the daemon's calls "
        "included), full steps by CUDA events. Mean step in ms:",
        "",
        "| context x batch | full KV (SDPA GQA) | louiskv, no boundary (bound) | louiskv, 11.7% boundaries "
        "| louiskv, every step | quest, every step | speed-up at 11.7% | GPU KV: full / kvrecall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for context, batch in configs:
        full = _row(rows, "full", context, batch)
        bound, measured, every = (_row(rows, "louiskv", context, batch, r) for r in (0.0, MEASURED_RATE, 1.0))
        quest = _row(rows, "quest", context, batch)
        if not (full and bound and measured):
            continue
        cell = lambda r: "-" if r is None else f"{r['mean_ms']:.2f}"  # noqa: E731
        memory = f"{full['gpu_kv_gib']:.1f} / {measured['daemon_gpu_gib']:.2f} GiB"
        lines.append(
            f"| {context // 1024}K x {batch} | {full['median_ms']:.2f} | {cell(bound)} | {cell(measured)} "
            f"| {cell(every)} | {cell(quest)} | {full['median_ms'] / measured['mean_ms']:.2f}x | {memory} |"
        )
    skipped = meta.get("skipped") or []
    if skipped:
        lines += ["", "Not measured in that run: " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def rewrite(readme: Path, json_path: Path) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no perf markers")
    block = render(json.loads(json_path.read_text()), os.path.relpath(json_path, readme.parent))
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m kvrecall.bench.readme bench/results/<run>-e2e.json")
    readme = Path("README.md")
    readme.write_text(rewrite(readme, Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
