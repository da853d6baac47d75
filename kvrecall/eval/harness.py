"""`kvrecall eval`: every KV policy on the bundled model, against full KV, in one run.

Two measurements, both through a real daemon (a :class:`~kvrecall.local.LocalDaemon` unless
``--target`` is given) with the model loaded once:

* **Long input, short output.** Seeded RULER-style samples from :mod:`kvrecall.eval.tasks`
  (only formats the model solves with full KV, see ``FORMATS.md``) are decoded greedily with
  ``full`` first, then with every policy x budget on the same samples, and scored with
  :func:`kvrecall.eval.tasks.score`.
* **Short input, long output (fidelity).** ``full`` generates N tokens greedily from a short
  prompt; every policy x budget then replays those tokens teacher-forced. Reported: top-1
  agreement with full's argmax, mean KL(full || policy) over the N steps, and the retrieval
  rate (boundaries per generated token).

Budgets. ``B`` is the retrieved-token budget per (layer, KV head). louiskv, quest and snapkv
take ``{"budget": B}`` and keep ``n_sink=16`` sinks and a ``window=64`` ring on top;
streaming has no retrieved region, so it gets ``{"window": B + 64}``: the same resident size
(16 + B + 64) as the others. ``"12%"`` means 12% of the prompt tokens of each sample (for
fidelity: 12% of prompt + generated tokens, the context the policy has to compress).
``full`` has no budget; its entries use the budget label ``"*"``.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("full", "streaming", "snapkv", "quest", "louiskv")
FULL_BUDGET = "*"
N_SINK, WINDOW = 16, 64

FIDELITY_PROMPTS = (
    "Write a long, detailed essay about the history of the printing press and how it changed Europe.",
    "Explain step by step how a steam engine works, then describe its role in the industrial revolution.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe in detail how to plan and plant a vegetable garden through a whole year.",
)


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


SUITES: dict[str, Suite] = {
    "ci": Suite(("niah_single",), (600,), (0,), ("128",), fidelity_prompts=1, fidelity_tokens=32),
    # 2 tasks x 1 seed: one ~1K-token run costs ~18 s on 2 contended cores (prefill + ingest),
    # so 2 samples x 9 cells + fidelity fits the 10-minute budget; 2 seeds would not.
    "smoke": Suite(("niah_single", "qa"), (1024,), (0,), ("128", "12%"), fidelity_prompts=1, fidelity_tokens=64),
    "full": Suite(
        ("niah_single", "niah_multikey", "niah_multivalue", "qa"),
        (2048, 4096, 8192),
        (0, 1),
        ("128", "256", "512", "1024", "12%"),
        depths=(0.1, 0.3, 0.5, 0.7, 0.9),
        fidelity_prompts=4,
        fidelity_tokens=1024,
    ),
}


def budget_tokens(label: str, context_tokens: int) -> int:
    """Resolve a budget label ("512" or "12%") to tokens for a context of ``context_tokens``."""
    if label.endswith("%"):
        return max(1, round(float(label[:-1]) / 100 * context_tokens))
    return int(label)


def policy_config(policy: str, budget: int | None) -> dict | None:
    """Session config of ``policy`` at retrieved budget ``budget`` (streaming: same resident size)."""
    if policy == "full" or budget is None:
        return None
    if policy == "streaming":
        return {"n_sink": N_SINK, "window": budget + WINDOW}
    return {"budget": budget, "n_sink": N_SINK, "window": WINDOW}


def interval95(mean: float, n: int) -> list[float]:
    """Wilson 95% score interval of a mean score in [0, 1] over ``n`` samples."""
    if n == 0:
        return [0.0, 1.0]
    z = 1.96
    denom = 1 + z * z / n
    center = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, mean * (1 - mean) / n + z * z / (4 * n * n))) / denom
    return [round(max(0.0, center - half), 4), round(min(1.0, center + half), 4)]


@dataclass
class Runner:
    """The model, tokenizer and daemon client shared by every run."""

    model: Any
    tokenizer: Any
    client: Any
    eos: set[int] = field(default_factory=set)

    def decode(self, input_ids: Any, policy: str, budget: int | None, new_tokens: int,
               forced: list[int] | None = None, stop: bool = True) -> Any:
        """One session: prefill ``input_ids`` then greedy (or teacher-forced) decoding."""
        from kvrecall.worker import decode, open_model_session

        max_tokens = input_ids.shape[1] + (len(forced) if forced else new_tokens) + 16
        session, cache = open_model_session(
            self.client, self.model, policy, policy_config(policy, budget), max_tokens, tag="eval"
        )
        with session:
            return decode(self.model, cache, input_ids, new_tokens, self.eos if stop else None, forced=forced)


def _cells(suite: Suite, policies: list[str]) -> list[tuple[str, str]]:
    """(policy, budget label) pairs, full first."""
    return [("full", FULL_BUDGET)] + [(p, b) for p in policies if p != "full" for b in suite.budgets]


def run_accuracy(runner: Runner, suite: Suite, policies: list[str], bar: Any) -> tuple[dict, list[dict]]:
    """Long-input / short-output scores; returns (results, per-sample records)."""
    from kvrecall.eval.tasks import make_sample, score

    records: list[dict] = []
    for task in suite.tasks:
        for length in suite.lengths:
            for depth in suite.depths:
                for seed in suite.seeds:
                    sample = make_sample(task, length, seed=seed, depth=depth, tokenizer=runner.tokenizer)
                    ids = runner.tokenizer(sample.prompt, return_tensors="pt").input_ids.to(runner.model.device)
                    prompt_tokens = int(ids.shape[1])
                    for policy, label in _cells(suite, policies):
                        budget = None if policy == "full" else budget_tokens(label, prompt_tokens)
                        bar.set_postfix_str(f"{task}@{length} s{seed} {policy}@{label}")
                        out = runner.decode(ids, policy, budget, sample.max_new_tokens)
                        text = runner.tokenizer.decode(out.tokens, skip_special_tokens=True)
                        records.append({
                            "task": task, "length": length, "seed": seed, "depth": round(sample.depth, 3),
                            "prompt_tokens": prompt_tokens, "policy": policy, "budget": label,
                            "budget_tokens": budget, "score": score(sample, text), "answer": text.strip(),
                            "expected": sample.answer, "boundaries": out.boundaries,
                            "max_resident": out.max_resident,
                        })
                        bar.update(1)
    results: dict = {}
    for r in records:
        cell = results.setdefault(r["policy"], {}).setdefault(r["budget"], {}).setdefault(r["task"], {})
        cell.setdefault(str(r["length"]), []).append(r["score"])
    for per_budget in results.values():
        for per_task in per_budget.values():
            for per_length in per_task.values():
                for length, scores in per_length.items():
                    mean = sum(scores) / len(scores)
                    per_length[length] = {"score": round(mean, 4), "n": len(scores), "ci95": interval95(mean, len(scores))}
    return results, records


def run_fidelity(runner: Runner, suite: Suite, policies: list[str], bar: Any) -> dict:
    """Teacher-forced replay of full's greedy output under each policy x budget."""
    import torch
    from torch.nn.functional import log_softmax

    from kvrecall.eval.tasks import chat_prompt

    sums: dict[tuple[str, str], dict[str, float]] = {}
    for prompt in FIDELITY_PROMPTS[: suite.fidelity_prompts]:
        ids = runner.tokenizer(chat_prompt(prompt, ""), return_tensors="pt").input_ids.to(runner.model.device)
        bar.set_postfix_str("fidelity full")
        ref = runner.decode(ids, "full", None, suite.fidelity_tokens, stop=False)
        bar.update(1)
        ref_logp = torch.stack([log_softmax(x.double(), -1) for x in ref.logits])
        context = int(ids.shape[1]) + len(ref.tokens)
        for policy, label in _cells(suite, policies)[1:]:
            budget = budget_tokens(label, context)
            bar.set_postfix_str(f"fidelity {policy}@{label}")
            out = runner.decode(ids, policy, budget, len(ref.tokens), forced=ref.tokens, stop=False)
            logp = torch.stack([log_softmax(x.double(), -1) for x in out.logits])
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            acc = sums.setdefault((policy, label), {"agree": 0, "kl": 0.0, "boundaries": 0, "n": 0, "context": 0})
            acc["agree"] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            acc["kl"] += float(kl.clamp_min(0).sum())
            acc["boundaries"] += out.boundaries
            acc["n"] += len(ref.tokens)
            acc["context"] = max(acc["context"], context)
            bar.update(1)
    fidelity: dict = {}
    for (policy, label), a in sums.items():
        fidelity.setdefault(policy, {})[label] = {
            "top1": round(a["agree"] / a["n"], 6), "kl": a["kl"] / a["n"],
            "retrieval_rate": round(a["boundaries"] / a["n"], 6), "n_tokens": int(a["n"]),
            "max_context_tokens": int(a["context"]),
        }
    return fidelity


def relative_to_full(records: list[dict]) -> dict[str, float | None]:
    """``"<policy>@<budget>"`` -> sum of scores / sum of full's scores on the same samples."""
    full = {(r["task"], r["length"], r["seed"], r["depth"]): r["score"] for r in records if r["policy"] == "full"}
    totals: dict[str, list[float]] = {}
    for r in records:
        key = "full" if r["policy"] == "full" else f"{r['policy']}@{r['budget']}"
        t = totals.setdefault(key, [0.0, 0.0])
        t[0] += r["score"]
        t[1] += full[(r["task"], r["length"], r["seed"], r["depth"])]
    return {k: (round(s / f, 4) if f > 0 else None) for k, (s, f) in totals.items()}


def markdown(report: dict) -> str:
    """The report as markdown tables (scores, relative to full, fidelity)."""
    meta = report["meta"]
    lines = [
        f"# kvrecall accuracy: suite `{meta['suite']}` ({meta['date']})", "",
        f"* command: `{meta['command']}`", f"* machine: {meta['machine']}",
        f"* wall time: {meta['wall_seconds']} s", f"* budgets: {meta['budget_note']}", "",
        "## Long input, short output (mean score, n, Wilson 95% interval)", "",
        "| policy | budget | task | length | score | n | ci95 |", "|---|---|---|---|---|---|---|",
    ]
    for policy, per_budget in report["results"].items():
        for label, per_task in per_budget.items():
            for task, per_length in per_task.items():
                for length, c in per_length.items():
                    lines.append(f"| {policy} | {label} | {task} | {length} | {c['score']:.3f} | {c['n']} "
                                 f"| {c['ci95'][0]:.2f}-{c['ci95'][1]:.2f} |")
    lines += ["", "## Relative to full (same samples)", "", "| policy@budget | score / full |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["relative_to_full"].items()]
    lines += ["", "## Fidelity (teacher-forced replay of full's greedy output)", "",
              "| policy | budget | top-1 agreement | mean KL(full‖policy) | retrieval rate | tokens |",
              "|---|---|---|---|---|---|"]
    for policy, per_budget in report["fidelity"].items():
        for label, f in per_budget.items():
            lines.append(f"| {policy} | {label} | {f['top1']:.4f} | {f['kl']:.3g} | {f['retrieval_rate']:.4f} "
                         f"| {f['n_tokens']} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """A one-line description of where this ran."""
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.platform()}, {os.cpu_count()} CPU cores, {where}, torch {torch.__version__}"


def run_eval(args: argparse.Namespace) -> int:
    """Entry point of ``kvrecall eval``; writes JSON + markdown under ``--out``."""
    import torch
    from tqdm import tqdm

    from kvrecall.client import KVRecallClient
    from kvrecall.local import LocalDaemon
    from kvrecall.models.smollm import load_model

    started = time.perf_counter()
    suite = SUITES[args.suite]
    if args.budgets:
        suite = Suite(**{**suite.__dict__, "budgets": tuple(args.budgets.split(","))})
    policies = args.policies.split(",") if args.policies else list(POLICIES)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise SystemExit(f"unknown policies: {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    print(f"kvrecall eval: suite {args.suite}; loading the model ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(device=args.device or os.environ.get("KVRECALL_DEVICE", "cpu"))
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None}
    cells = len(_cells(suite, policies))
    n_samples = len(suite.tasks) * len(suite.lengths) * len(suite.depths) * len(suite.seeds)
    with contextlib.ExitStack() as stack:
        target = args.target or stack.enter_context(LocalDaemon()).target
        client = stack.enter_context(KVRecallClient(target, "eval-worker"))
        runner = Runner(model, tokenizer, client, eos)
        with tqdm(total=n_samples * cells, desc="accuracy", unit="run", file=sys.stderr) as bar:
            results, records = run_accuracy(runner, suite, policies, bar)
        with tqdm(total=suite.fidelity_prompts * cells, desc="fidelity", unit="run", file=sys.stderr) as bar:
            fidelity = run_fidelity(runner, suite, policies, bar)
    date = _dt.date.today().isoformat()
    report = {
        "meta": {
            "suite": args.suite, "date": date, "machine": machine(),
            "command": " ".join(["kvrecall", *sys.argv[1:]]) if sys.argv[0].endswith("kvrecall") else " ".join(sys.argv),
            "policies": policies, "budgets": list(suite.budgets), "suite_config": suite.__dict__,
            "budget_note": "louiskv/quest/snapkv {budget: B, n_sink: 16, window: 64}; streaming "
                           "{n_sink: 16, window: B + 64} (same resident size); 'P%' = P% of the prompt tokens "
                           "(fidelity: of prompt + generated tokens)",
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
        "results": results,
        "fidelity": fidelity,
        "relative_to_full": relative_to_full(records),
        "samples": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"accuracy-{args.suite}-{date}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr, flush=True)
    summary = {
        "relative_to_full": report["relative_to_full"],
        "fidelity": {f"{p}@{b}": v for p, per in fidelity.items() for b, v in per.items()},
        "wall_seconds": report["meta"]["wall_seconds"],
        "json": str(stem.with_suffix(".json")),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(markdown(report))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``kvrecall eval`` flags."""
    parser.add_argument("--suite", choices=sorted(SUITES), default="smoke")
    parser.add_argument("--policies", help=f"comma-separated (default {','.join(POLICIES)})")
    parser.add_argument("--budgets", help="comma-separated tokens or P%% of the prompt (default: the suite's)")
    parser.add_argument("--out", default="bench/results", help="directory for the JSON and markdown files")
    parser.add_argument("--target", help="daemon address (default: start a local daemon)")
    parser.add_argument("--device", help="cpu | cuda[:N] (default: $KVRECALL_DEVICE or cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object as the last line")
