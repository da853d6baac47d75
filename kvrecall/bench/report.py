"""The printed table and the PNG plot (step time vs context per policy, the bound drawn in)."""

from __future__ import annotations

from typing import Any

from kvrecall.bench.common import GiB


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue sets targets for, from this run's numbers (absent where not measured)."""
    out: dict[str, Any] = {}
    gather = results.get("gather", {})
    for backend, report in gather.get("backends", {}).items():
        largest = max(p["rows"] for p in report["points"])
        pcts = [p["pct_of_copy_ceiling"] for p in report["points"] if p["rows"] == largest and p["row_bytes"] >= 256]
        if pcts:
            out[f"gather_{backend}_min_pct_of_copy_rows_ge_256B"] = min(pcts)
    decode = results.get("decode", {})
    key = f"r={decode.get('measured_rate', 0):g}"
    for config in decode.get("configs", []):
        ratios = config.get("ratios", {}).get(key)
        if not ratios:
            continue
        tag = f"T{config['context']}_B{config['batch']}"
        for name in ("louiskv_over_bound", "louiskv-overlap_over_bound", "louiskv_speedup_vs_full",
                     "louiskv_speedup_vs_perstep-host-a", "louiskv_speedup_vs_perstep-host-b",
                     "louiskv-overlap_speedup_vs_perstep-host-a", "louiskv-overlap_speedup_vs_perstep-host-b"):
            if name in ratios:
                out[f"{tag}_{name}"] = ratios[name]
        out[f"{tag}_louiskv_gpu_kv_fraction_of_full"] = config["ratios"].get("louiskv_gpu_kv_fraction_of_full")
    concurrency = results.get("concurrency", {}).get("louiskv", {}).get("host_limited", {})
    for name in ("speedup_vs_full", "speedup_vs_full_overlapped"):
        if name in concurrency:
            out[f"concurrency_{name}"] = concurrency[name]
    if "best_share_of_prefill" in results.get("clustering", {}):
        out["clustering_share_of_prefill"] = results["clustering"]["best_share_of_prefill"]
    return out


def format_table(results: dict[str, Any]) -> str:
    """A plain-text summary of every part that ran."""
    lines: list[str] = []
    meta = results["meta"]
    lines.append(f"device {meta.get('device')} | torch {meta['torch']} | triton {meta.get('triton')} | "
                 f"cupy {meta.get('cupy')} | {meta['date_utc']}")
    lines += _ceilings_lines(results.get("ceilings", {}))
    lines += _gather_lines(results.get("gather", {}))
    lines += _decode_lines(results.get("decode", {}))
    lines += _concurrency_lines(results.get("concurrency", {}))
    lines += _clustering_lines(results.get("clustering", {}))
    if results.get("headline"):
        lines.append(f"== headline (measured rate r={results.get('decode', {}).get('measured_rate')})")
        lines += [f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in results["headline"].items()]
    for part, err in results.get("errors", {}).items():
        lines.append(f"!! {part} failed: {err.splitlines()[-1] if err else err}")
    return "\n".join(lines)


def _ceilings_lines(c: dict[str, Any]) -> list[str]:
    if "h2d_pinned" not in c:
        return [f"== ceilings: {c.get('skipped', 'not run')}"]
    return ["== ceilings",
            f"h2d pinned {c['h2d_pinned']['GBps']:.1f} GB/s | d2d {c['d2d']['copy_GBps']:.0f} GB/s copied = "
            f"{c['d2d']['read_plus_write_GBps']:.0f} GB/s read+written | bf16 gemm {c['gemm_bf16']['TFLOPs']:.0f} TFLOP/s"]


def _gather_lines(g: dict[str, Any]) -> list[str]:
    backends = g.get("backends", {})
    if not backends:
        return ["== gather: not measured"]
    lines = [f"== gather GB/s (% of {g['ceiling_GBps']:.1f} GB/s copy) at the largest row count"]
    sizes = sorted({p["row_bytes"] for b in backends.values() for p in b["points"]})
    lines.append("row B  " + "  ".join(f"{name:>16}" for name in backends))
    for size in sizes:
        cells = []
        for b in backends.values():
            pts = [p for p in b["points"] if p["row_bytes"] == size]
            top = max(pts, key=lambda p: p["rows"]) if pts else None
            cells.append(f"{top['GBps']:7.1f} ({top['pct_of_copy_ceiling']:3.0f}%)" if top else "-")
        lines.append(f"{size:>5}  " + "  ".join(f"{c:>16}" for c in cells))
    if "staged_cpu_gather" in g:
        s = g["staged_cpu_gather"]
        lines.append(f"staged (CPU index_select + copy) {s['row_bytes']} B x {s['rows']}: {s['GBps']:.1f} GB/s")
    return lines


def _decode_lines(d: dict[str, Any]) -> list[str]:
    configs = d.get("configs", [])
    if not configs:
        return ["== decode: not measured"]
    rate = d["measured_rate"]
    key = f"r={rate:g}"
    lines = [f"== decode step ms; louiskv = average at r={rate:g} (boundary step in brackets); "
             "L-ovl = retrieval overlapped with the next step; x = speedup of louiskv",
             f"{'T':>7} {'B':>3} {'full':>7} {'bound':>7} {'louiskv':>15} {'L-ovl':>15} {'pstep-a':>8} "
             f"{'pstep-b':>8} {'L/bnd':>6} {'Lo/bnd':>6} {'x full':>6} {'x a':>5} {'x b':>5} {'KV L/full':>9}"]
    for c in configs:
        p, r = c["policies"], c.get("ratios", {}).get(key, {})
        louis = p.get("louiskv", {})
        cells = []
        for avg_key, boundary_key in (("avg_step_ms", "boundary_step_ms"),
                                      ("avg_step_ms_overlapped", "overlapped_boundary_step_ms")):
            cells.append(f"{louis[avg_key][f'{rate:g}']:.2f} [{louis[boundary_key]:.1f}]" if avg_key in louis else "-")
        lines.append(
            f"{c['context']:>7} {c['batch']:>3} {_fmt(p.get('full', {}).get('step_ms')):>7} "
            f"{_fmt(p.get('bound', {}).get('step_ms')):>7} {cells[0]:>15} {cells[1]:>15} "
            f"{_fmt(p.get('perstep-host-a', {}).get('step_ms')):>8} {_fmt(p.get('perstep-host-b', {}).get('step_ms')):>8} "
            f"{_fmt(r.get('louiskv_over_bound'), '.3f'):>6} {_fmt(r.get('louiskv-overlap_over_bound'), '.3f'):>6} "
            f"{_fmt(r.get('louiskv_speedup_vs_full')):>6} {_fmt(r.get('louiskv_speedup_vs_perstep-host-a')):>5} "
            f"{_fmt(r.get('louiskv_speedup_vs_perstep-host-b')):>5} "
            f"{_fmt(c.get('ratios', {}).get('louiskv_gpu_kv_fraction_of_full'), '.3f'):>9}")
    return lines


def _concurrency_lines(c: dict[str, Any]) -> list[str]:
    if not c:
        return ["== concurrency: not measured"]
    lines = [f"== concurrency at T={c['context']}, GPU KV cap {c['gpu_kv_cap_bytes'] / GiB:.1f} GiB, r={c['rate']:g}"]
    full = c["full"]
    lines.append(f"full: {full['sequences']} seqs, {_fmt(full.get('tokens_per_s'), '.0f')} tok/s")
    for label in ("host_limited", "gpu_limited"):
        entry = c["louiskv"].get(label)
        if entry:
            lines.append(f"louiskv ({label}): {entry['sequences']} seqs, {_fmt(entry.get('tokens_per_s'), '.0f')} tok/s "
                         f"= {_fmt(entry.get('speedup_vs_full'))}x full; overlapped "
                         f"{_fmt(entry.get('tokens_per_s_overlapped'), '.0f')} tok/s "
                         f"= {_fmt(entry.get('speedup_vs_full_overlapped'))}x")
    return lines


def _clustering_lines(c: dict[str, Any]) -> list[str]:
    if "prefill" not in c:
        return ["== clustering: not measured"]
    lines = [f"== clustering {c['tokens']} tokens: prefill {c['prefill']['median_ms']:.1f} ms"]
    for name, e in c["kmeans"].items():
        lines.append(f"k-means[{name}]: " + (f"{e['median_ms']:.1f} ms = {100 * e['share_of_prefill']:.1f}% of prefill"
                                             if "median_ms" in e else e.get("error", "?")))
    return lines


def plot_decode(results: dict[str, Any], path: str) -> str | None:
    """Step time vs context, one panel per batch; returns an error string or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed"
    decode = results.get("decode", {})
    configs = decode.get("configs", [])
    if not configs:
        return "no decode results"
    rate = decode["measured_rate"]
    batches = sorted({c["batch"] for c in configs})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    series = {"full": "step_ms", "perstep-host-a": "step_ms", "perstep-host-b": "step_ms",
              "louiskv": "avg_step_ms", "louiskv-overlap": "avg_step_ms_overlapped"}
    for ax, batch in zip(axes[0], batches, strict=True):
        rows = sorted((c for c in configs if c["batch"] == batch), key=lambda c: c["context"])
        contexts = [c["context"] for c in rows]
        for name, field in series.items():
            ys = []
            for c in rows:
                p = c["policies"].get("louiskv" if name.startswith("louiskv") else name, {})
                ys.append(p.get(field, {}).get(f"{rate:g}") if name.startswith("louiskv") else p.get(field))
            if all(y is None for y in ys):
                continue
            label = f"{name} (r={rate:g})" if name.startswith("louiskv") else name
            ax.plot(contexts, [float("nan") if y is None else y for y in ys], marker="o", label=label)
        bound = [c["policies"].get("bound", {}).get("step_ms") for c in rows]
        ax.plot(contexts, [float("nan") if y is None else y for y in bound], "k--", label="bound (no retrieval)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts, [f"{t // 1024}K" if t >= 1024 else str(t) for t in contexts])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step (ms)")
        ax.set_title(f"batch {batch} - {results['meta'].get('device')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
