"""Turning eval records into the report: aggregated scores with Wilson intervals, fidelity,
the markdown table and the PNG plots.

``python -m kvrecall.eval.report accuracy-full-DATE.json`` re-renders the markdown and plots of
a saved report (e.g. one written on a machine without matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from kvrecall.eval.cells import FULL_BUDGET

DEPTH_BINS = (0.2, 0.4, 0.6, 0.8, 1.0)
"""Upper edges of the needle-depth bins of the depth x length grid."""


def interval95(mean: float, n: int) -> list[float]:
    """Wilson 95% score interval of a mean score in [0, 1] over ``n`` samples."""
    if n == 0:
        return [0.0, 1.0]
    z = 1.96
    denom = 1 + z * z / n
    center = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, mean * (1 - mean) / n + z * z / (4 * n * n))) / denom
    return [round(max(0.0, center - half), 4), round(min(1.0, center + half), 4)]


INDICATIVE_BELOW = 20
"""Cells of fewer samples are marked ``indicative``: their interval is too wide to rank policies."""


def _cell(scores: list[float]) -> dict:
    mean = sum(scores) / len(scores)
    n = len(scores)
    return {"score": round(mean, 4), "n": n, "ci95": interval95(mean, n), "indicative": n < INDICATIVE_BELOW}


def family_suffix(record: dict) -> str:
    """``""`` for a question-in-prompt record, ``"/doc_first"`` for a document-first one: the
    suffix of its task key in ``results`` and of its key in ``relative_to_full``."""
    family = record.get("family", "in_prompt")
    return "" if family == "in_prompt" else f"/{family}"


def accuracy_results(records: list[dict]) -> dict:
    """``results[policy][budget][task][length] = {score, n, ci95, indicative}``; a document-first
    record's task is ``"<task>/doc_first"``."""
    grouped: dict = {}
    for r in records:
        task = r["task"] + family_suffix(r)
        cell = grouped.setdefault(r["policy"], {}).setdefault(r["budget"], {}).setdefault(task, {})
        cell.setdefault(str(r["length"]), []).append(r["score"])
    return {
        p: {
            b: {t: {n: _cell(s) for n, s in per_len.items()} for t, per_len in per_task.items()}
            for b, per_task in per_budget.items()
        }
        for p, per_budget in grouped.items()
    }


def depth_bin(depth: float) -> str:
    """The label of ``depth``'s bin, e.g. ``"0.4-0.6"``."""
    lo = 0.0
    for hi in DEPTH_BINS:
        if depth <= hi:
            return f"{lo:.1f}-{hi:.1f}"
        lo = hi
    return f"{DEPTH_BINS[-2]:.1f}-{DEPTH_BINS[-1]:.1f}"


def depth_grid(records: list[dict]) -> dict:
    """``grid[policy][budget][depth bin][length] = {score, n, ci95, indicative}`` over every
    task and seed; document-first records under ``"<policy>/doc_first"``."""
    grouped: dict = {}
    for r in records:
        per = (
            grouped.setdefault(r["policy"] + family_suffix(r), {})
            .setdefault(r["budget"], {})
            .setdefault(depth_bin(r["depth"]), {})
        )
        per.setdefault(str(r["length"]), []).append(r["score"])
    return {
        p: {
            b: {
                d: {n: _cell(s) for n, s in per_len.items()}
                for d, per_len in per_depth.items()
            }
            for b, per_depth in per_budget.items()
        }
        for p, per_budget in grouped.items()
    }


def _sample(record: dict) -> tuple:
    return (record["task"], record["length"], record["seed"], record["depth"], family_suffix(record))


def _relative_totals(records: list[dict]) -> dict[str, tuple[list[float], list[float], list[dict]]]:
    """``"<policy>@<budget>[/<family>]"`` -> (its scores, full's scores on the same samples,
    its records)."""
    full = {_sample(r): r["score"] for r in records if r["policy"] == "full"}
    totals: dict[str, tuple[list[float], list[float], list[dict]]] = {}
    for r in records:
        sample = _sample(r)
        if sample not in full:
            continue
        key = ("full" if r["policy"] == "full" else f"{r['policy']}@{r['budget']}") + sample[-1]
        scores, reference, mine = totals.setdefault(key, ([], [], []))
        scores.append(r["score"])
        reference.append(full[sample])
        mine.append(r)
    return totals


def retrieval_rate(records: list[dict]) -> float | None:
    """Retrievals per generated token over ``records`` (a question chunk's retrieval counts as
    one); None for records written before they counted their steps."""
    steps = sum(r.get("steps", 0) for r in records)
    if not steps or not all("steps" in r for r in records):
        return None
    return round(sum(r["boundaries"] for r in records) / steps, 4)


def relative_to_full(records: list[dict]) -> dict[str, float | None]:
    """``"<policy>@<budget>"`` (question in the prompt) and ``"<policy>@<budget>/doc_first"``
    -> sum of scores / sum of full's scores on the same samples (``full``, ``full/doc_first``: 1)."""
    return {
        k: (round(sum(s) / sum(f), 4) if sum(f) > 0 else None) for k, (s, f, _) in _relative_totals(records).items()
    }


def relative_detail(records: list[dict]) -> dict[str, dict]:
    """Each :func:`relative_to_full` key -> ``{ratio, n, score, ci95, full_score, full_ci95,
    indicative, retrieval_rate}``: the ratio with the two means it divides and their Wilson
    intervals, and the cell's retrievals per generated token."""
    out = {}
    for key, (scores, full, cell_records) in _relative_totals(records).items():
        mine, theirs = _cell(scores), _cell(full)
        out[key] = {
            "ratio": round(sum(scores) / sum(full), 4) if sum(full) > 0 else None,
            "n": mine["n"],
            "score": mine["score"],
            "ci95": mine["ci95"],
            "full_score": theirs["score"],
            "full_ci95": theirs["ci95"],
            "indicative": mine["indicative"],
            "retrieval_rate": retrieval_rate(cell_records),
        }
    return out


def fidelity_results(cells: list[dict], group: str) -> dict:
    """Fidelity cells of ``group`` ("short" or "long") summed per policy x budget (short) or per
    policy x budget x document length (long): ``{top1, kl, kl_max, retrieval_rate, n_tokens,
    n_prompts, max_context_tokens, budget_tokens}``."""
    sums: dict = {}
    for c in cells:
        if c["group"] != group:
            continue
        key = (c["policy"], c["budget"]) + ((str(c["length"]),) if group == "long" else ())
        a = sums.setdefault(key, defaultdict(float))
        for name in ("agree", "kl_sum", "boundaries", "n"):
            a[name] += c[name]
        a["prompts"] += 1
        a["kl_max"] = max(a["kl_max"], c["kl_max"])
        a["context"] = max(a["context"], c["context_tokens"])
        a["budget_tokens"] = max(a["budget_tokens"], c["budget_tokens"] or 0)
    out: dict = {}
    for key, a in sums.items():
        node = out.setdefault(key[0], {})
        if group == "long":
            node = node.setdefault(key[1], {})
        top1 = a["agree"] / a["n"]
        node[key[-1]] = {
            "top1": round(top1, 6),
            "top1_ci95": interval95(top1, int(a["n"])),  # over tokens, which are not independent
            "indicative": a["prompts"] < INDICATIVE_BELOW,
            "kl": a["kl_sum"] / a["n"],
            "kl_max": a["kl_max"],
            "retrieval_rate": round(a["boundaries"] / a["n"], 6),
            "n_tokens": int(a["n"]),
            "n_prompts": int(a["prompts"]),
            "max_context_tokens": int(a["context"]),
            "budget_tokens_max": int(a["budget_tokens"]),
        }
    return out


def flat_fidelity(fidelity: dict, long_fidelity: dict) -> dict[str, dict]:
    """``"<policy>@<budget>"`` (short) and ``"<policy>@<budget>/<length>"`` (long) -> metrics."""
    flat = {f"{p}@{b}": v for p, per in fidelity.items() for b, v in per.items()}
    flat.update(
        {
            f"{p}@{b}/{n}": v
            for p, per in long_fidelity.items()
            for b, per_n in per.items()
            for n, v in per_n.items()
        }
    )
    return flat


# ---- markdown -------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    """The report as markdown tables (scores, relative to full, fidelity)."""
    meta = report["meta"]
    lines = [
        f"# kvrecall accuracy: suite `{meta['suite']}` ({meta['date']})",
        "",
        f"* command: `{meta['command']}`",
        f"* machine: {meta['machine']}",
        f"* wall time: {meta['wall_seconds']} s ({meta.get('workers', 1)} worker process(es))",
        f"* budgets: {meta['budget_note']}",
    ]
    if meta.get("skipped_units") or meta.get("errors"):
        lines.append(
            f"* incomplete: {len(meta.get('skipped_units', []))} units skipped at the time budget, "
            f"{len(meta.get('errors', []))} failed"
        )
    if report["results"]:  # a suite of replays only ("fidelity") has no accuracy tables
        lines += [
            "",
            "## Long input, short output (mean score, n, Wilson 95% interval)",
            "",
            f"Tasks ending in `/doc_first`: the document ingested alone, the question after it. "
            f"`*`: n < {INDICATIVE_BELOW}, indicative only.",
            "",
            "| policy | budget | task | length | score | n | ci95 |",
            "|---|---|---|---|---|---|---|",
        ]
        for policy, per_budget in report["results"].items():
            for label, per_task in per_budget.items():
                for task, per_length in per_task.items():
                    for length, c in per_length.items():
                        lines.append(
                            f"| {policy} | {label} | {task} | {length} | {c['score']:.3f}{_mark(c)} | {c['n']} "
                            f"| {c['ci95'][0]:.2f}-{c['ci95'][1]:.2f} |"
                        )
        lines += [
            "",
            "## Relative to full (same samples)",
            "",
            "| policy@budget | score / full | n | score (ci95) | full (ci95) | retrievals / token |",
            "|---|---|---|---|---|---|",
        ]
        detail = report.get("relative_detail", {})
        for key, ratio in report["relative_to_full"].items():
            d = detail.get(key)
            if d is None:  # a report written before the detail existed
                lines.append(f"| {key} | {ratio} | | | | |")
                continue
            lines.append(
                f"| {key} | {ratio}{_mark(d)} | {d['n']} | {d['score']:.3f} ({d['ci95'][0]:.2f}-{d['ci95'][1]:.2f}) "
                f"| {d['full_score']:.3f} ({d['full_ci95'][0]:.2f}-{d['full_ci95'][1]:.2f}) "
                f"| {'' if d.get('retrieval_rate') is None else d['retrieval_rate']} |"
            )
    header = [
        "| policy | budget | top-1 agreement (ci95 over tokens) | mean KL(full‖policy) | max KL | retrieval rate "
        "| tokens | prompts |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(policy: str, label: str, f: dict, extra: str = "") -> str:
        ci = f.get("top1_ci95")
        interval = f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        return (
            f"| {policy} | {label}{extra} | {f['top1']:.4f}{interval} | {f['kl']:.3g} | {f['kl_max']:.3g} "
            f"| {f['retrieval_rate']:.4f} | {f['n_tokens']} | {f['n_prompts']}{_mark(f)} |"
        )

    if report["fidelity"]:
        lines += ["", "## Short input, long output (teacher-forced replay of full's greedy output)", "", *header]
        for policy, per_budget in report["fidelity"].items():
            lines += [row(policy, label, f) for label, f in per_budget.items()]
    if report["long_fidelity"]:
        lines += ["", "## Long input, long output (document, then full's greedy report replayed)", "", *header]
        for policy, per_budget in report["long_fidelity"].items():
            for label, per_length in per_budget.items():
                lines += [row(policy, label, f, f" @ {n} tokens") for n, f in per_length.items()]
    return "\n".join(lines) + "\n"


def _mark(cell: dict) -> str:
    return "*" if cell.get("indicative") else ""


# ---- plots ----------------------------------------------------------------------------------


def _budget_order(labels: list[str]) -> list[str]:
    return sorted(labels, key=lambda b: (b.endswith("%"), float(b.rstrip("%"))))


def plots(report: dict, stem: Path) -> list[str]:
    """Write ``<stem>-score.png`` and ``-depth.png`` (when there are accuracy samples) and
    ``-fidelity.png``; returns their paths
    ([] when matplotlib is missing: re-render later with ``python -m kvrecall.eval.report``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    budgets = _budget_order(list(report["meta"]["budgets"]))
    policies = [p for p in report["meta"]["policies"] if p != "full"]

    # score vs budget: mean over every task x length x sample, one line per policy (a suite
    # with no accuracy samples, e.g. "fidelity", gets no score plot)
    if report["samples"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        by_cell: dict = defaultdict(list)
        for r in report["samples"]:
            by_cell[(r["policy"] + family_suffix(r), r["budget"])].append(r["score"])
        # the question in the prompt: solid lines; the document first: dashed, same marker
        suffixes = sorted({family_suffix(r) for r in report["samples"]})
        for suffix in suffixes:
            full = by_cell.get(("full" + suffix, FULL_BUDGET))
            if full:
                ax.axhline(sum(full) / len(full), color="black", linestyle=":" if suffix else "--",
                           label="full" + suffix)  # fmt: skip
        for k, policy in enumerate(policies):
            for suffix in suffixes:
                name = policy + suffix
                xs = [i for i, b in enumerate(budgets) if by_cell.get((name, b))]
                nudge = 0.04 * (k - (len(policies) - 1) / 2)  # equal scores stay visible side by side
                ax.plot(
                    [x + nudge for x in xs],
                    [sum(by_cell[(name, budgets[i])]) / len(by_cell[(name, budgets[i])]) for i in xs],
                    marker="os^vDP"[k % 6],
                    linestyle="--" if suffix else "-",
                    color=f"C{k}",
                    label=name,
                )
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlabel("budget (tokens per layer and KV head, or % of the prompt)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Long input, short output ({report['meta']['suite']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}-score.png", dpi=110)
        plt.close(fig)
        written.append(f"{stem}-score.png")

    # fidelity vs budget: top-1 agreement and mean KL, short and long input
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    for col, (title, data) in enumerate(
        (
            ("short input, long output", report["fidelity"]),
            ("long input, long output", report["long_fidelity"]),
        )
    ):
        for policy in policies:
            per_budget = data.get(policy, {})
            pts = []
            for i, b in enumerate(budgets):
                if b not in per_budget:
                    continue
                f = per_budget[b]
                if "top1" not in f:  # long: pool the document lengths
                    n = sum(v["n_tokens"] for v in f.values())
                    f = {
                        "top1": sum(v["top1"] * v["n_tokens"] for v in f.values()) / n,
                        "kl": sum(v["kl"] * v["n_tokens"] for v in f.values()) / n,
                    }
                pts.append((i, f["top1"], max(f["kl"], 1e-12)))
            if pts:
                axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
                axes[1][col].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=policy)
        axes[0][col].set_title(title)
        axes[0][col].set_ylabel("top-1 agreement with full")
        axes[1][col].set_ylabel("mean KL(full || policy)")
        axes[1][col].set_yscale("log")
        for row in (0, 1):
            axes[row][col].set_xticks(range(len(budgets)), budgets)
            if axes[row][col].lines:  # a suite without this kind of replay leaves the panel empty
                axes[row][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{stem}-fidelity.png", dpi=110)
    plt.close(fig)
    written.append(f"{stem}-fidelity.png")

    # needle depth x length grid: a row per policy, a column per budget
    grid = report["depth_grid"]
    rows = [p + f for f in ("", "/doc_first") for p in report["meta"]["policies"] if p + f in grid]
    cols = [FULL_BUDGET] + budgets
    lengths = sorted({str(r["length"]) for r in report["samples"]}, key=int)
    bins = [depth_bin(hi - 0.01) for hi in DEPTH_BINS]
    if rows and lengths:
        fig, axes = plt.subplots(
            len(rows), len(cols), figsize=(1.9 * len(cols) + 1, 1.7 * len(rows) + 1), squeeze=False
        )
        for i, policy in enumerate(rows):
            for j, label in enumerate(cols):
                ax = axes[i][j]
                ax.set_xticks([])
                ax.set_yticks([])
                per_depth = grid[policy].get(label)
                if per_depth is None:
                    ax.axis("off")
                    continue
                values = [
                    [per_depth.get(d, {}).get(n, {}).get("score", float("nan")) for n in lengths]
                    for d in bins
                ]
                ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_title(f"{policy}@{label}", fontsize=8)
                if j == (0 if policy.startswith("full") else 1):
                    ax.set_yticks(range(len(bins)), bins, fontsize=6)
                ax.set_xticks(range(len(lengths)), lengths, fontsize=6)
        fig.suptitle("score by needle depth (rows) x prompt length (columns)", fontsize=10)
        fig.tight_layout()
        fig.savefig(f"{stem}-depth.png", dpi=100)
        plt.close(fig)
        written.append(f"{stem}-depth.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """Re-render the markdown and plots of a saved report JSON beside it."""
    parser = argparse.ArgumentParser(prog="python -m kvrecall.eval.report", description=main.__doc__)
    parser.add_argument("json_path")
    args = parser.parse_args(argv)
    path = Path(args.json_path)
    report = json.loads(path.read_text())
    stem = path.with_suffix("")
    stem.with_suffix(".md").write_text(markdown(report))
    for written in plots(report, stem):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
