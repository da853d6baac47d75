"""Tensor parallelism on one host's GPUs: correctness and per-rank step time (`python -m kvrecall.tp.bench`).

Starts one daemon per GPU (daemon r on cuda:r), then, each phase guarded so one failure
leaves the others' results:

1. check: `kvrecall.tp.check` on the GPUs (NCCL): a tiny fp32 llama at TP=N against the
   model's own full attention, rank agreement, and the single-GPU kvrecall run;
2. tp: `kvrecall.tp.step_time` at TP=N (rank r on cuda:r, its daemon's session);
3. single: the same at TP=1 on cuda:0 (same code, one rank, all heads).

Writes tp_bench.json and prints a table; per-rank JSON and logs land beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from kvrecall.tp.launch import rank_daemons, run_ranks

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _read(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def _phase(results: dict[str, Any], name: str, deadline: float, share: float, fn) -> None:
    """Run one phase with `share` of the time left; an error becomes its entry."""
    left = deadline - time.monotonic()
    if left < 20:
        results[name] = {"skipped": f"time budget spent ({left:.0f} s left)"}
        return
    started = time.monotonic()
    try:
        results[name] = fn(max(20.0, left * share))
    except Exception as exc:  # noqa: BLE001 - the other phases still run
        results[name] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    results[name]["phase_seconds"] = round(time.monotonic() - started, 1)
    print(f"== {name}: {results[name].get('error', 'ok')} ({results[name]['phase_seconds']} s)", flush=True)


def _fmt(entry: dict[str, Any], key: str = "median_ms") -> str:
    return f"{entry[key]:.2f}" if entry and entry.get("n") else "-"


def table(results: dict[str, Any]) -> str:
    lines = []
    check = results.get("check", {})
    if "ranks" in check:
        c = check["ranks"]
        lines.append(
            "check (tiny fp32 llama, TP={}): max |logit diff| vs full attention {:.2e}, ranks agree on "
            "boundary steps: {}, vs single-GPU kvrecall: {:.2e}, same boundary steps: {}".format(
                len(c),
                max(r["exact"]["max_logit_diff_vs_full"] for r in c),
                check["ranks_agree"],
                c[0]["single"]["max_logit_diff_vs_tp"],
                check["single_same_boundaries"],
            )
        )
    header = (
        f"{'run':<10}{'rank':>5}{'heads q/kv':>11}{'step ms':>9}{'p90':>8}{'plain':>8}{'bnd step':>9}"
        f"{'bnd rate':>9}{'retr same':>10}{'retr fresh':>11}{'allred ms':>10}{'prefill s':>10}{'GiB':>7}"
    )
    lines += [header, "-" * len(header)]
    for name in ("single", "tp"):
        for r in results.get(name, {}).get("ranks", []):
            lines.append(
                f"{name:<10}{r['rank']:>5}{r['rank_heads']['query']:>6}/{r['rank_heads']['kv']:<4}"
                f"{_fmt(r['step']):>9}{_fmt(r['step'], 'p90_ms'):>8}{_fmt(r['plain_step']):>8}"
                f"{_fmt(r['boundary_step']):>9}{r['boundary_rate']:>9.2f}{_fmt(r['retrieval_same_query']):>10}"
                f"{_fmt(r['retrieval_fresh_query']):>11}{_fmt(r['all_reduce_hidden']):>10}"
                f"{r['prefill_and_ingest_s']:>10.1f}{r.get('max_memory_allocated_gib', 0.0):>7.1f}"
            )
    if results.get("speedup_median_step"):
        ratio = results["speedup_median_step"]
        lines.append(
            f"one-GPU median step / slowest TP rank's median step = {ratio:.2f} (above 1: TP is faster)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument(
        "--device", default="cuda", help="cuda | cpu (a smoke run of the whole pipeline, gloo)"
    )
    parser.add_argument("--shape", default="llama3-8b", help="llama3-8b | tiny")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--host-pool-gb", type=float, default=8.0)
    parser.add_argument("--time-budget-s", type=float, default=320.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.time_budget_s
    out = Path(args.out)
    logs = out / "logs"
    for key, value in NO_MULTICAST.items():
        os.environ[key] = value  # inherited by the daemons and the ranks
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world}: only {torch.cuda.device_count()} CUDA devices visible")
    results: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "devices": [torch.cuda.get_device_name(i) for i in range(args.world)] if cuda else ["cpu"],
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "config": vars(args),
        "env": NO_MULTICAST,
    }
    # CPU smoke runs: one thread per rank, or the ranks and daemons oversubscribe the cores
    rank_env = {} if cuda else {"OMP_NUM_THREADS": "1"}
    step_args = [
        "--device", args.device, "--shape", args.shape, "--context", str(args.context), "--layers", str(args.layers), "--steps", str(args.steps),
        "--budget", str(args.budget),
    ]  # fmt: skip
    with rank_daemons(
        args.world, args.device, logs, host_pool_gb=args.host_pool_gb, device_pool_gb=2.0
    ) as daemons:
        targets = [d.target for d in daemons]

        def check(timeout: float) -> dict[str, Any]:
            argv = ["--targets", ",".join(targets), "--device", args.device, "--out", str(out), "--single"]
            run_ranks("kvrecall.tp.check", argv, args.world, logs, timeout, rank_env)
            ranks = _read([out / f"check-rank{r}.json" for r in range(args.world)])
            small = [r["small"]["boundary_steps"] for r in ranks]
            return {
                "ranks": ranks,
                "ranks_agree": all(s == small[0] for s in small),
                "single_same_boundaries": ranks[0]["single"]["boundary_steps"] == small[0],
            }

        def timing(world: int):
            def run(timeout: float) -> dict[str, Any]:
                run_ranks("kvrecall.tp.step_time", ["--targets", ",".join(targets[:world]), "--out", str(out),
                                                    *step_args], world, logs, timeout, rank_env)  # fmt: skip
                return {"ranks": _read([out / f"step-w{world}-rank{r}.json" for r in range(world)])}

            return run

        for name, share, fn in (
            ("check", 0.3, check),
            ("tp", 0.5, timing(args.world)),
            ("single", 0.9, timing(1)),
        ):
            _phase(results, name, deadline, share, fn)
            (out / "tp_bench.json").write_text(json.dumps(results, indent=1))  # kept if a later phase hangs
    tp, single = results["tp"].get("ranks"), results["single"].get("ranks")
    if tp and single:
        slowest = max(r["step"]["median_ms"] for r in tp)
        results["speedup_median_step"] = single[0]["step"]["median_ms"] / slowest
    text = table(results)
    results["table"] = text
    (out / "tp_bench.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
