"""How close louiskv's answer distribution stays to full KV's on one question-in-prompt sample
(docs/TUNING.md cites it for the marginal niah_multikey sample): the prompt is prefilled once,
then full KV and each louiskv variant decode greedily from it; per variant the answer, its score
and the top-3 next-token probabilities of the first `--steps` steps.

    python scripts/inprompt_probe.py --task niah_multikey --length 4096 --depth 0.5 --seed 1 \\
        --variant '{}' --variant '{"observation": 8}' --out probe.json

Each variant is a JSON object of settings over `--budget` and the eval's sink / window (as the
eval's cells: windowkv keeps its own), for louiskv unless it names another `"policy"`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvrecall.client import KVRecallClient
from kvrecall.eval.cells import N_SINK, WINDOW
from kvrecall.eval.runner import Runner
from kvrecall.eval.tasks import make_sample, score
from kvrecall.local import LocalDaemon
from kvrecall.models.smollm import load_model, load_tokenizer


def variant(raw: str, budget: int) -> tuple[str, str, dict]:
    """A --variant's (name, policy, config)."""
    settings = json.loads(raw)
    policy = settings.pop("policy", "louiskv")
    resident = {} if policy == "windowkv" else {"n_sink": N_SINK, "window": WINDOW}
    return raw, policy, {**resident, "budget": budget, **settings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="niah_multikey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="steps whose top-3 probabilities are printed")
    parser.add_argument("--variant", action="append", default=[], help="louiskv settings as JSON (repeatable)")
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = [("full", "full", None)] + [variant(raw, args.budget) for raw in args.variant or ["{}"]]
    tokenizer = load_tokenizer()
    model, _ = load_model(device="cpu")
    sample = make_sample(args.task, args.length, seed=args.seed, depth=args.depth, tokenizer=tokenizer)
    rows = []
    with LocalDaemon(host_pool_gb=2, device_pool_gb=2, device="cpu") as daemon, KVRecallClient(
        daemon.target, "inprompt-probe"
    ) as client:
        runner = Runner(model, tokenizer, client)
        prefill = runner.prefill(sample.prompt)
        for name, policy, config in variants:
            started = time.perf_counter()
            out = runner.decode_cell(prefill, policy, config, sample.max_new_tokens)
            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
            top = []
            for logits in out.logits[: args.steps]:
                p, i = torch.softmax(logits.float(), -1).topk(3)
                top.append({tokenizer.decode([int(t)]): round(float(q), 4) for t, q in zip(i, p, strict=True)})
            row = {"variant": name, "answer": text.strip(), "score": score(sample, text), "top3": top}
            rows.append(row)
            print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "expected": sample.answer, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
