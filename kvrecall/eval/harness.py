"""`kvrecall eval`: every KV policy on the bundled model, against full KV, in one run.

Three measurements, all through a real daemon (a :class:`~kvrecall.local.LocalDaemon` on the
model's device unless ``--target`` is given):

* **Long input, short output.** Seeded RULER-style samples from :mod:`kvrecall.eval.tasks`
  (only formats the model solves with full KV, see ``FORMATS.md``) are decoded greedily with
  ``full`` and with every policy x budget on the same samples, and scored with
  :func:`kvrecall.eval.tasks.score`. Each sample runs in the suite's families: ``in_prompt``
  (the question inside the ingested prompt) and ``doc_first`` (the document ingested alone,
  then the question as one chunk after the ingest, then greedy decoding: a cached document
  asked later, where only decode-time retrieval can find what the question needs).
* **Short input, long output (fidelity).** Full KV generates N tokens greedily from a short
  prompt; every policy x budget then replays those tokens teacher-forced. Reported: top-1
  agreement with full's argmax, mean KL(full || policy) over the N steps, and the retrieval
  rate (boundaries per generated token).
* **Long input, long output.** The same fidelity metrics after a long document
  (:func:`kvrecall.eval.tasks.longdoc`) asking for a long report.

Budgets and policy configs: :mod:`kvrecall.eval.cells`. Work is split into units
(:mod:`kvrecall.eval.runner`) run by one in-process model or ``--workers N`` subprocesses
(:mod:`kvrecall.eval.pool`); each prompt is prefilled once per process and its KV handed to
every policy's session. ``--time-budget-s`` stops starting units after that many seconds: the
report then says which units were skipped. Output (``--out``): ``accuracy-<suite>-<date>.json``
(``results[policy][budget][task][length] = {score, n, ci95}``, ``fidelity``, ``long_fidelity``,
``depth_grid``, ``relative_to_full``, every sample, and the date, machine and command), the
same as markdown, and PNG plots (:mod:`kvrecall.eval.report`). With ``--json`` the LAST stdout
line is a JSON summary whose ``relative_to_full`` maps ``"<policy>@<budget>"`` (question in
the prompt) and ``"<policy>@<budget>/doc_first"`` to that policy's score divided by full's on
the same samples. Every reported cell carries n and a 95% interval; n < 20 is marked indicative.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvrecall.eval.cells import (
    BUDGET_NOTE,
    OVERRIDES_ENV,
    POLICIES,
    available_policies,
    cells,
    check_budget_label,
    parse_overrides,
)

FIDELITY_PROMPTS = (
    "Write a long, detailed essay about the history of the printing press and how it changed Europe.",
    "Explain step by step how a steam engine works, then describe its role in the industrial revolution.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe in detail how to plan and plant a vegetable garden through a whole year.",
)

KV_BYTES_PER_TOKEN = 30 * 3 * 64 * 2 * 4
"""Host / working-set bytes of one token of the bundled model (30 layers x 3 KV heads x 64 x K,V
x float32), for sizing the local daemon's pools."""


@dataclass(frozen=True)
class Suite:
    """What one ``--suite`` runs."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    seeds: tuple[int, ...]
    budgets: tuple[str, ...]
    depths: tuple[float | None, ...] = (None,)  # None: the seed draws the depth
    fidelity_prompts: int = 1
    fidelity_tokens: int = 64
    long_lengths: tuple[int, ...] = ()  # document lengths of the long-input, long-output part
    long_docs: int = 1  # documents per length (seeds 0..N-1)
    long_tokens: int = 64
    fidelity_budgets: tuple[str, ...] | None = None  # budgets of the short-input replays (None: budgets)
    long_budgets: tuple[str, ...] | None = None  # budgets of the long-input replays (None: budgets)
    skip: tuple[tuple[str, int], ...] = ()  # (task, length) pairs not run: full KV fails them (FORMATS.md)
    families: tuple[str, ...] = ("in_prompt",)  # how the question arrives (kvrecall.eval.tasks.FAMILIES)

    def __post_init__(self) -> None:
        from kvrecall.eval.tasks import FAMILIES, TASKS

        for family in self.families:
            if family not in FAMILIES:
                raise ValueError(f"families: unknown family {family!r} (known: {', '.join(FAMILIES)})")
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"tasks: unknown task {task!r}")
        for task, length in self.skip:
            if task not in self.tasks or length not in self.lengths:
                raise ValueError(f"skip: ({task!r}, {length}) is not one of the suite's (task, length) pairs")
        for name in ("lengths", "long_lengths"):
            if any(n < 128 for n in getattr(self, name)):
                raise ValueError(f"{name}: every length must be at least 128 tokens")
        for label in self.budgets + (self.fidelity_budgets or ()) + (self.long_budgets or ()):
            try:
                check_budget_label(label)
            except ValueError as exc:
                raise ValueError(f"budgets: {exc}") from None
        if not 0 <= self.fidelity_prompts <= len(FIDELITY_PROMPTS):
            raise ValueError(f"fidelity_prompts: must be in [0, {len(FIDELITY_PROMPTS)}]")
        if self.fidelity_tokens < 1 or self.long_tokens < 1:
            raise ValueError("fidelity_tokens / long_tokens: must be at least 1")


SUITES: dict[str, Suite] = {
    # CI: one ~600-token needle, a 32-token replay of a short prompt, 16 tokens after a 256-token document.
    "ci": Suite(
        ("niah_single",),
        (600,),
        (0,),
        ("128",),
        fidelity_prompts=1,
        fidelity_tokens=32,
        long_lengths=(256,),
        long_tokens=16,
    ),
    # <= 10 minutes on 2 CPU cores: 2 samples x 11 cells (one prefill each) with the question in
    # the prompt and the same 2 with the document first, 64-token replays.
    "smoke": Suite(
        ("niah_single", "qa"),
        (1024,),
        (0,),
        ("128", "12%"),
        fidelity_prompts=1,
        fidelity_tokens=64,
        long_lengths=(1024,),
        long_tokens=64,
        families=("in_prompt", "doc_first"),
    ),
    # The document first, the question after it (a cached document asked later): every scored
    # task at 2K and 4K, five depths, budgets 128 / 512; the in-prompt twins of the same samples.
    "doc_first": Suite(
        ("niah_single", "niah_multikey", "qa"),
        (2048, 4096),
        (0,),
        ("128", "512"),
        depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        fidelity_prompts=0,
        families=("in_prompt", "doc_first"),
    ),
    # Prompt-side selection on CPU (~10 minutes on 2 cores): one 4K needle at five depths, two
    # budgets, no replays (the prefill is shared by every cell of a sample).
    "needle": Suite(
        ("niah_single",),
        (4096,),
        (0,),
        ("128", "512"),
        depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        fidelity_prompts=0,
    ),
    # Short input, long output only: every fidelity prompt, 1024 replayed tokens, budgets 128
    # and 512 (the full suite replays one prompt; this one runs on a CPU in ~40 minutes).
    "fidelity": Suite(
        (),
        (),
        (0,),
        ("128", "512"),
        fidelity_prompts=len(FIDELITY_PROMPTS),
        fidelity_tokens=1024,
    ),
    # Long input, long output only (reasoning after a document): 4,000 replayed tokens after one
    # 2K and one 4K document (4,096 + 4,000 positions stay inside the model's 8,192), budgets
    # 512 and 1024.
    "long_output": Suite(
        (),
        (),
        (0,),
        ("512", "1024"),
        fidelity_prompts=0,
        long_lengths=(2048, 4096),
        long_docs=1,
        long_tokens=4000,
        long_budgets=("512", "1024"),
    ),
    # One GPU call of ~9 minutes on 2 GPUs, 16 workers before the document-first family doubled
    # its accuracy units (see FORMATS.md, "The full suite on the GPU"): 3 tasks x 3 lengths x 3
    # depths x 2 seeds x 2 families at 5 budgets, less qa at 8000 (full KV 3/6 there); 1024-token replays of one short prompt (budgets 128, 512) and after one 2K-token
    # document (512, 1024). 8000, not 8192: prompt + answer stay within 8192 positions.
    "full": Suite(
        ("niah_single", "niah_multikey", "qa"),  # niah_multivalue: < 80% with full KV (FORMATS.md)
        (2048, 4096, 8000),
        (0, 1),
        ("128", "256", "512", "1024", "12%"),
        depths=(0.1, 0.5, 0.9),
        fidelity_prompts=1,
        fidelity_tokens=1024,
        long_lengths=(2048,),
        long_docs=1,
        long_tokens=1024,
        fidelity_budgets=("128", "512"),
        long_budgets=("512", "1024"),
        skip=(("qa", 8000),),
        families=("in_prompt", "doc_first"),
    ),
}

SPREAD = (0.5, 0.1, 0.9, 0.3, 0.7)
"""Depth order in which coverage grows evenly when a time budget cuts the run short."""


def _spread(depths: tuple[float | None, ...]) -> list[float | None]:
    return sorted(depths, key=lambda d: SPREAD.index(d) if d in SPREAD else len(SPREAD))


def accuracy_units(suite: Suite, policies: list[str]) -> list[tuple[float, dict]]:
    """One unit per sample and family, ordered so that coverage grows evenly (seed, depth,
    length, task, family: a sample's families run side by side)."""
    pairs = cells(policies, suite.budgets)
    keys = [
        (seed, depth, length, task, family)
        for seed in suite.seeds
        for depth in _spread(suite.depths)
        for length in suite.lengths
        for task in suite.tasks
        if (task, length) not in suite.skip
        for family in suite.families
    ]
    return [
        (
            (i + 0.5) / len(keys),
            {
                "kind": "accuracy",
                "id": f"acc:{task}:{length}:{depth}:{seed}" + ("" if family == "in_prompt" else f":{family}"),
                "task": task,
                "length": length,
                "depth": depth,
                "seed": seed,
                "family": family,
                "cells": pairs,
            },
        )
        for i, (seed, depth, length, task, family) in enumerate(keys)
    ]


def reference_units(suite: Suite, tokenizer: Any) -> list[tuple[float, dict]]:
    """Full KV's greedy output of each fidelity prompt: short prompts, then long documents."""
    from kvrecall.eval.tasks import chat_prompt, longdoc

    units = [
        {
            "kind": "reference",
            "id": f"ref:short:{i}",
            "group": "short",
            "length": None,
            "prompt": chat_prompt(p, ""),
            "tokens": suite.fidelity_tokens,
        }
        for i, p in enumerate(FIDELITY_PROMPTS[: suite.fidelity_prompts])
    ]
    units += [
        {
            "kind": "reference",
            "id": f"ref:long:{n}:{seed}",
            "group": "long",
            "length": n,
            "prompt": longdoc(n, seed=seed, tokenizer=tokenizer).prompt,
            "tokens": suite.long_tokens,
        }
        for n in suite.long_lengths
        for seed in range(suite.long_docs)
    ]
    return [(-1.0, u) for u in units]


def fidelity_units(
    reference: dict, result: dict, index: int, total: int, pairs: list[tuple[str, str]]
) -> list:
    """The (policy, budget) replays of one finished reference; cell k of reference ``index`` of
    ``total`` gets priority (k + index / total) / len(pairs), so references advance together."""
    return [
        (
            (k + index / total + 0.5 / total) / len(pairs),
            {
                "kind": "fidelity",
                "id": f"fid:{reference['id'][4:]}:{policy}@{label}",
                "group": reference["group"],
                "length": reference["length"],
                "prompt": reference["prompt"],
                "tokens": result["tokens"],
                "policy": policy,
                "budget": label,
            },
        )
        for k, (policy, label) in enumerate(pairs)
    ]


def machine(device: str) -> str:
    """A one-line description of where this ran."""
    import torch

    where = "CPU"
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        where = torch.cuda.get_device_name(0) if count == 1 else f"{count}x {torch.cuda.get_device_name(0)}"
    return f"{platform.platform()}, {os.cpu_count()} CPU cores, {where}, torch {torch.__version__}"


def worker_devices(device: str, workers: int, gpu_count: int) -> list[str]:
    """The device of each worker: with ``device == "cuda"`` and several GPUs, workers are dealt
    round-robin over them (``cuda:0``, ``cuda:1``, ...); otherwise every worker uses ``device``."""
    if workers < 1:
        raise ValueError(f"workers: must be at least 1, got {workers}")
    if device != "cuda" or gpu_count <= 1:
        return [device] * workers
    return [f"cuda:{i % gpu_count}" for i in range(workers)]


def auto_workers(device: str, gpu_count: int, cpu_count: int) -> int:
    """``--workers 0``: one process on a CPU (it has the cores to itself); on CUDA 8 per GPU
    (a step of the test model is launch-bound, so processes share a GPU well), at most half the
    CPU cores (each process's Python needs one, the daemons the rest)."""
    if not device.startswith("cuda"):
        return 1
    return max(1, min(8 * max(1, gpu_count), cpu_count // 2))


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("kvrecall eval: --device cuda but CUDA is not available")
    return device


def _command() -> str:
    if os.path.basename(sys.argv[0]) in ("kvrecall", "__main__.py", "cli.py"):
        return " ".join(["kvrecall", *sys.argv[1:]])
    return " ".join(sys.argv)


def _policies(arg: str | None) -> list[str]:
    registered = available_policies()
    if not arg:
        return registered
    wanted = arg.split(",")
    unknown = [p for p in wanted if p not in POLICIES]
    if unknown:
        raise SystemExit(
            f"kvrecall eval: unknown policies: {', '.join(unknown)} (known: {', '.join(POLICIES)})"
        )
    missing = [p for p in wanted if p not in registered]
    if missing:
        raise SystemExit(f"kvrecall eval: policies not registered in this build: {', '.join(missing)}")
    return ["full"] + [p for p in wanted if p != "full"]


OVERRIDABLE = {
    "budgets": str,
    "tasks": str,
    "lengths": int,
    "depths": float,
    "seeds": int,
    "families": str,
    "long_lengths": int,
    "long_budgets": str,
}
"""Suite fields a comma-separated flag of the same name replaces, with the type of its items."""


def suite_with_overrides(suite: Suite, args: argparse.Namespace) -> Suite:
    """``suite`` with the fields given as flags (``--tasks qa --lengths 2048``) replaced; a
    skip pair left without its task or length is dropped. Raises ValueError naming the field."""
    fields = {}
    for name, kind in OVERRIDABLE.items():
        value = getattr(args, name, None)
        if value:
            try:
                fields[name] = tuple(kind(item) for item in value.split(","))
            except ValueError:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag}: {value!r} is not a comma-separated list of {kind.__name__}") from None
    if not fields:
        return suite
    merged = replace(suite, **fields, skip=())
    skip = tuple((t, n) for t, n in suite.skip if t in merged.tasks and n in merged.lengths)
    return replace(merged, skip=skip)


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``kvrecall eval``; writes JSON, markdown and PNGs under ``--out``."""
    import torch
    from tqdm import tqdm

    from kvrecall.client import KVRecallClient
    from kvrecall.eval import report as rep
    from kvrecall.eval.pool import Schedule, WorkerProcess, run
    from kvrecall.eval.runner import Runner
    from kvrecall.local import LocalDaemon
    from kvrecall.models.smollm import load_model, load_tokenizer

    started = time.perf_counter()
    try:
        suite = suite_with_overrides(SUITES[args.suite], args)
    except ValueError as exc:
        raise SystemExit(f"kvrecall eval: {exc}") from None
    if args.policy_config:
        try:
            os.environ[OVERRIDES_ENV] = json.dumps(parse_overrides(args.policy_config))
        except ValueError as exc:
            raise SystemExit(f"kvrecall eval: {exc}") from None
    policies = _policies(args.policies)
    device = resolve_device(args.device or os.environ.get("KVRECALL_DEVICE", "auto"))
    if args.workers < 0:
        raise SystemExit(f"kvrecall eval: --workers must be 0 (auto) or more, got {args.workers}")
    gpus = _cuda_count() if device == "cuda" else 0  # "cuda" deals workers over them all
    workers = args.workers or auto_workers(device, gpus, os.cpu_count() or 1)
    torch.manual_seed(0)
    print(
        f"kvrecall eval: suite {args.suite} on {device}, {workers} worker(s), policies {','.join(policies)}",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = load_tokenizer()
    if args.time_budget_s:
        # No unit starts after the budget; running ones give up a grace period later.
        grace = max(30.0, 0.2 * args.time_budget_s)
        schedule = Schedule(time.monotonic() + args.time_budget_s, time.time() + args.time_budget_s + grace)
    else:
        schedule = Schedule()
    references = reference_units(suite, tokenizer)
    schedule.add(references + accuracy_units(suite, policies))
    ref_index = {u["id"]: (i, u) for i, (_, u) in enumerate(references)}
    replays = {
        "short": cells(policies, suite.fidelity_budgets or suite.budgets)[1:],
        "long": cells(policies, suite.long_budgets or suite.budgets)[1:],
    }
    total = schedule.queued + sum(len(replays[u["group"]]) for _, u in references)
    results: dict[str, list[dict]] = {"accuracy": [], "fidelity": [], "reference": []}
    # Pools: every worker may hold one session of the longest context (host copy + working set).
    max_context = max(
        [n + 64 for n in suite.lengths]
        + [n + suite.long_tokens + 16 for n in suite.long_lengths]
        + [suite.fidelity_tokens + 128]
    )

    with contextlib.ExitStack() as stack, tqdm(total=total, desc="eval", unit="unit", file=sys.stderr) as bar:

        def handle(result: dict) -> list:
            bar.update(1)
            bar.set_postfix_str(result["id"][:48])
            if result["kind"] == "abandoned":
                return []
            if result["kind"] == "error":
                print(
                    f"kvrecall eval: unit {result['id']} failed: {result['error']}",
                    file=sys.stderr,
                    flush=True,
                )
                return []
            results[result["kind"]].append(result)
            if result["kind"] == "reference":
                index, unit = ref_index[result["id"]]
                return fidelity_units(unit, result, index, len(references), replays[unit["group"]])
            return []

        devices = worker_devices(device, workers, gpus)
        if args.target:
            targets = {d: args.target for d in devices}
        else:
            # One daemon per GPU the workers use (each worker talks to its own GPU's daemon, so
            # its tensors come over CUDA IPC on that device); its pools sized for its workers.
            targets = {}
            for d in dict.fromkeys(devices):
                share = devices.count(d)
                gb = math.ceil(4 * (share * max_context * KV_BYTES_PER_TOKEN * 2 / 2**30 + 0.5)) / 4
                daemon_device = "cuda:0" if d == "cuda" else d
                targets[d] = stack.enter_context(
                    LocalDaemon(host_pool_gb=gb, device_pool_gb=gb, device=daemon_device)
                ).target
        if workers == 1:
            model, _ = load_model(device=devices[0])
            client = stack.enter_context(KVRecallClient(targets[devices[0]], "eval-worker"))
            executors = [Runner(model, tokenizer, client).execute]
        else:
            logs = Path(tempfile.mkdtemp(prefix="kvrecall-eval-"))
            threads = max(1, (os.cpu_count() or 2) // (workers + len(targets)))
            procs = [
                WorkerProcess(targets[d], d, logs / f"worker{i}.log", threads) for i, d in enumerate(devices)
            ]
            for proc in procs:
                stack.callback(proc.close)
            executors = [p.execute for p in procs]
        run(schedule, executors, handle)

    records = [r for unit in sorted(results["accuracy"], key=lambda u: u["id"]) for r in unit["records"]]
    fidelity_cells = sorted(results["fidelity"], key=lambda u: u["id"])
    date = _dt.date.today().isoformat()
    seconds_by_kind = {k: round(sum(u["seconds"] for u in v), 1) for k, v in results.items()}
    report = {
        "meta": {
            "suite": args.suite,
            "date": date,
            "machine": machine(device),
            "device": device,
            "workers": workers,
            "worker_devices": sorted(set(devices)),
            "command": _command(),
            "policies": policies,
            "budgets": list(suite.budgets),
            "suite_config": asdict(suite),
            "budget_note": BUDGET_NOTE,
            "policy_config_overrides": json.loads(os.environ.get(OVERRIDES_ENV) or "{}"),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "time_budget_s": args.time_budget_s,
            "unit_seconds": seconds_by_kind,
            "skipped_units": schedule.skipped,
            "errors": schedule.errors,
        },
        "results": rep.accuracy_results(records),
        "fidelity": rep.fidelity_results(fidelity_cells, "short"),
        "long_fidelity": rep.fidelity_results(fidelity_cells, "long"),
        "depth_grid": rep.depth_grid(records),
        "relative_to_full": rep.relative_to_full(records),
        "relative_detail": rep.relative_detail(records),
        "samples": records,
        "fidelity_cells": fidelity_cells,
        "references": [
            {"id": r["id"], "tokens": r["tokens"]}
            for r in sorted(results["reference"], key=lambda u: u["id"])
        ],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accuracy-{args.suite}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(rep.markdown(report))
    pngs = rep.plots(report, stem)
    print(f"wrote {stem}.json, {stem}.md and {len(pngs)} plots", file=sys.stderr, flush=True)
    summary = {
        "relative_to_full": report["relative_to_full"],
        "fidelity": rep.flat_fidelity(report["fidelity"], report["long_fidelity"]),
        "wall_seconds": report["meta"]["wall_seconds"],
        "skipped_units": len(schedule.skipped),
        "errors": len(schedule.errors),
        "json": str(stem.with_suffix(".json")),
        "markdown": str(stem.with_suffix(".md")),
        "plots": pngs,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(rep.markdown(report))
    return 1 if schedule.errors else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kvrecall eval`` flags."""
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="smoke",
        help="ci: one short sample (CI); smoke: ~10 min on 2 CPU cores; needle: one 4K needle at five "
        "depths; fidelity: long-output replays; long_output: 4,000-token replays after a 2K and a 4K "
        "document; full: the GPU suite (default smoke)",
    )
    parser.add_argument(
        "--policies", help=f"comma-separated (default: every registered one of {','.join(POLICIES)})"
    )
    parser.add_argument(
        "--budgets", help="comma-separated tokens or P%% of the prompt (default: the suite's)"
    )
    parser.add_argument("--tasks", help="comma-separated task names (default: the suite's)")
    parser.add_argument("--lengths", help="comma-separated prompt lengths in tokens (default: the suite's)")
    parser.add_argument("--depths", help="comma-separated needle depths in [0, 1] (default: the suite's)")
    parser.add_argument("--seeds", help="comma-separated sample seeds (default: the suite's)")
    parser.add_argument("--families", help="comma-separated: in_prompt, doc_first (default: the suite's)")
    parser.add_argument(
        "--long-lengths", help="comma-separated document lengths of the long-output replays (default: the suite's)"
    )
    parser.add_argument(
        "--long-budgets", help="comma-separated budgets of the long-output replays (default: the suite's)"
    )
    parser.add_argument(
        "--out", default="bench/results", help="directory for the JSON, markdown and PNG files"
    )
    parser.add_argument(
        "--target", help="daemon address (default: start a local daemon on the model's device)"
    )
    parser.add_argument("--device", help="auto | cpu | cuda[:N] (default: $KVRECALL_DEVICE or auto)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="model processes (0 = auto: 1 on a CPU; on CUDA 8 per GPU, at most half the CPU cores)",
    )
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="start no unit after this many seconds, give up running ones max(30, 20%%) later "
        "(the report lists the skipped ones)",
    )
    parser.add_argument(
        "--policy-config",
        action="append",
        default=[],
        metavar="POLICY=JSON",
        help="extra config fields for every cell of a policy, e.g. louiskv='{\"threshold\": 0.7}' (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
