"""Render README's performance tables from committed benchmark JSON, so text and numbers cannot
drift: `python -m kvrecall.bench.readme bench/results/<run>-e2e.json [more -e2e.json] [<run>-prefill.json]`
rewrites the block between the README's perf markers (decode, `kvrecall bench e2e`: one run, or
several rendered into one table) and the one
between its prefill markers (`python -m kvrecall.bench.prefill`); tests check each block equals
the rendering of the JSON it names."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- perf:start (python -m kvrecall.bench.readme) -->", "<!-- perf:end -->"
PREFILL_START, PREFILL_END = "<!-- prefill:start (python -m kvrecall.bench.readme) -->", "<!-- prefill:end -->"
MEASURED_RATE = 0.117
DEFAULT_LAG = 4  # kvrecall.engine.engine.DEFAULT_LAG (not imported: this module stays torch-free)


def _row(rows: list[dict[str, Any]], policy: str, context: int, batch: int, rate: float | None = None):
    """The step row of (policy, context, batch[, rate]); of several lags, the engine's default."""
    found = [r for r in rows if r["part"] == "step" and (r["policy"], r["context"], r["batch"]) == (policy, context, batch)
             and (rate is None or r["rate"] == rate)]  # fmt: skip
    return next((r for r in found if r.get("lag") == DEFAULT_LAG), found[0] if found else None)


def _config(skipped: str) -> str:
    """The "CONTEXTxBATCH" a skipped entry names."""
    return skipped.split(":", 1)[0].strip()


def render(result: dict[str, Any], source: str, *more: tuple[dict[str, Any], str]) -> str:
    """The decode table of one e2e run, or of several (each its own configurations, e.g. one
    per GPU of a machine): every run's command, device and file are named."""
    runs = [(result, source), *more]
    rows = [row for run, _ in runs for row in run["rows"]]
    measured_by = "; ".join(
        f"`{run['meta']['command']}` on {run['meta'].get('device')} ({run['meta']['date_utc'][:10]}; `{path}`, "
        "plot beside it)"
        for run, path in runs
    )
    configs = sorted({(r["context"], r["batch"]) for r in rows if r["part"] == "step"})
    drifts = sorted({run["meta"].get("query_drift", 1.0) for run, _ in runs} - {1.0})
    emulated = (
        f" Emulated retrieval queries (`--query-drift {', '.join(map(str, drifts))}`: each forced crossing "
        "retrieves for a query only part of the way from the last one, as a real model's retrievals overlap)."
        if drifts else ""
    )
    overlaps = {bool(run["meta"].get("overlap")) for run, _ in runs}
    if overlaps == {True}:
        overlap = " each launched before the host work of the one before (`--overlap on`);"
    elif overlaps == {False}:
        overlap = " each run after the host work of the one before (`--overlap off`);"
    else:
        overlap = " with overlap in some runs, not in others;"
    lines = [
        f"Measured by {measured_by}.{emulated} Llama-3-8B shape, random bf16 weights, budget 1024; every step "
        f"graph-captured,{overlap} kvrecall steps timed on the host around `Engine.step()` (the daemon's calls "
        f"included; boundaries answered {DEFAULT_LAG} steps later, the engine's default), full steps by "
        "CUDA events. Mean step in ms:",
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
    shared = sorted({(r["context"], r["batch"]) for r in rows if r["part"] == "step" and r.get("shared_prompt")
                     and r["batch"] > 1})  # fmt: skip
    if shared:
        lines += ["", f"{_configs(shared)}: the batch's sequences decode over one shared prompt document "
                  "(`--shared-prompt`: the daemon holds it once in the host tier, as when many requests ask about one "
                  "document); each has its own working set, boundaries, retrievals and output."]
    for r in rows:
        if r["part"] == "step" and r["policy"] == "full" and r.get("kv_layers_shared"):
            lines += ["", f"Full KV at {_configs([(r['context'], r['batch'])])} needs {r['gpu_kv_gib']:.0f} GiB of "
                      f"KV, more than the GPU holds beside the weights: its step is timed with {r['kv_layers']} KV "
                      "buffers shared by all the layers, each layer attending over the whole live length (the same "
                      "work); a full-KV engine could not run it."]
    # What a run skipped ("131072x8: ...") unless another run of the table measured it.
    skipped = [item for run, _ in runs for item in run["meta"].get("skipped") or []
               if _config(item) not in {f"{c}x{b}" for c, b in configs}]  # fmt: skip
    if skipped:
        lines += ["", "Not measured in that run: " + "; ".join(skipped) + "."]
    return "\n".join(lines)


def _configs(configs: list[tuple[int, int]]) -> str:
    return ", ".join(f"{context // 1024}K x {batch}" for context, batch in configs)


def render_prefill(result: dict[str, Any], source: str) -> str:
    meta, config = result["meta"], result["config"]
    gib = 1 / (1 << 30)
    lines = [
        f"Measured by `{meta['command']}` on {meta.get('device')} ({meta['date_utc'][:10]}; `{source}`). "
        f"Llama-3-8B shape, random bf16 weights, transformers with SDPA for both columns; kvrecall: "
        f"{config['policy']} at budget {config['budget']}, prompt in chunks of {config['chunk']} tokens layer by "
        f"layer, a daemon on the same GPU. Peak worker GPU memory above the weights over prefill + "
        f"{config['steps']} decode steps; prefill wall time (the first session after daemon start, and a "
        "second one):",
        "",
        "| context | full KV peak | kvrecall peak | ratio | daemon GPU (share of full KV) | full prefill "
        "| kvrecall, first session | kvrecall, warm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for context, r in result["contexts"].items():
        full, warm, first = r["full"], r["kvrecall"], r["kvrecall_first"]
        lines.append(
            f"| {int(context) // 1024}K | {full['peak_worker_bytes'] * gib:.2f} GiB | "
            f"{warm['peak_worker_bytes'] * gib:.2f} GiB | {r['ratios']['worker_peak_vs_full']:.2f}x | "
            f"{warm['daemon_device_bytes'] * gib:.2f} GiB ({100 * r['ratios']['daemon_device_vs_full_kv']:.1f}%) | "
            f"{full['prefill_s']:.2f} s | {first['prefill_s']:.2f} s ({r['ratios']['prefill_first_vs_full']:.2f}x) | "
            f"{warm['prefill_s']:.2f} s ({r['ratios']['prefill_warm_vs_full']:.2f}x) |"
        )
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, block: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{block}\n{end}{tail}"


def rewrite(readme: Path, json_path: Path, text: str | None = None, *more: Path) -> str:
    """README's text with the block for `json_path` (an e2e or a prefill result; `more` e2e
    results render into the same table) re-rendered."""
    text = readme.read_text() if text is None else text
    result = json.loads(json_path.read_text())
    source = os.path.relpath(json_path, readme.parent)
    if "rows" in result:
        others = [(json.loads(p.read_text()), os.path.relpath(p, readme.parent)) for p in more]
        return _replace(text, START, END, render(result, source, *others), readme)
    return _replace(text, PREFILL_START, PREFILL_END, render_prefill(result, source), readme)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m kvrecall.bench.readme bench/results/<run>-e2e.json [more -e2e.json] "
                         "[<run>-prefill.json]")
    readme = Path("README.md")
    text = readme.read_text()
    e2e = [Path(p) for p in argv if p.endswith("-e2e.json")]
    if e2e:
        text = rewrite(readme, e2e[0], text, *e2e[1:])
    for path in argv:
        if not path.endswith("-e2e.json"):
            text = rewrite(readme, Path(path), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
