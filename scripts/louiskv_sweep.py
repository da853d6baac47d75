"""Tune louiskv's boundary rule on the bundled model, through a real daemon (docs/TUNING.md).

For each case, full KV generates greedily; louiskv then replays the same tokens teacher-forced
under every (signal, threshold) pair, plus two references: a retrieval on every step
(threshold 1) and none after ingest (threshold -1). Reported per pair: top-1
agreement with full, mean KL(full || louiskv), and the boundary rate (boundaries per
generated token). The default should sit where the rate is low and the agreement is as
good as retrieving every step.

    python scripts/louiskv_sweep.py --out bench/results/louiskv-sweep.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import platform
import sys
import time

import torch
from torch.nn.functional import log_softmax

from kvrecall.client import KVRecallClient
from kvrecall.eval.harness import FIDELITY_PROMPTS
from kvrecall.eval.tasks import chat_prompt, make_sample
from kvrecall.local import LocalDaemon
from kvrecall.models.smollm import load_model
from kvrecall.worker import decode, open_model_session


def cases(tokenizer, args) -> list[tuple[str, torch.Tensor, int, int]]:
    """(name, input_ids, generated tokens, budget)."""
    out = []
    for i, prompt in enumerate(FIDELITY_PROMPTS[: args.prompts]):
        ids = tokenizer(chat_prompt(prompt, ""), return_tensors="pt").input_ids
        out.append((f"short-in/long-out #{i}", ids, args.tokens, args.budget))
    if args.long_input:
        sample = make_sample("qa", args.long_input, 0, tokenizer=tokenizer)
        ids = tokenizer(
            sample.prompt + " Then summarise the document in detail.", return_tensors="pt"
        ).input_ids
        out.append((f"long-in/long-out qa@{args.long_input}", ids, args.long_tokens, args.budget))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--long-input", type=int, default=2048)
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--max-segments", default="64", help="comma-separated louiskv max_segment values")
    ap.add_argument("--signals", default="post,pre")
    ap.add_argument("--thresholds", default="0.6,0.7,0.75,0.8,0.85")
    ap.add_argument("--no-references", action="store_true", help="skip the every-step / never rows (shards)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench/results/louiskv-sweep.json")
    args = ap.parse_args(argv)
    started = time.time()
    torch.manual_seed(0)
    model, tokenizer = load_model(device=args.device)
    segments = [int(m) for m in args.max_segments.split(",")]
    grid = [
        (s, float(t), m)
        for s, t, m in itertools.product(args.signals.split(","), args.thresholds.split(","), segments)
    ]
    if not args.no_references:
        grid += [("post", 1.0, segments[0]), ("post", -1.0, segments[0])]  # every step / never
    rows: list[dict] = []

    def save() -> None:
        machine = f"{platform.platform()}, {args.device}"
        if args.device == "cuda":
            machine += f" {torch.cuda.get_device_name(0)}"
        result = {
            "date": dt.date.today().isoformat(),
            "machine": f"{machine}, torch {torch.__version__}",
            "command": "python " + " ".join(sys.argv),
            "seconds": round(time.time() - started, 1),
            "rows": rows,
        }
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(LocalDaemon(device="cuda:0" if args.device == "cuda" else "cpu"))
        client = stack.enter_context(KVRecallClient(daemon.target, "sweep"))
        references = []  # full KV's greedy output per case, first, so a cut-short run has whole rows
        for name, ids, n_new, budget in cases(tokenizer, args):
            ids = ids.to(args.device)
            max_tokens = ids.shape[1] + n_new + 16
            session, cache = open_model_session(client, model, "full", None, max_tokens)
            with session:
                ref = decode(model, cache, ids, n_new)
            ref_logp = torch.stack([log_softmax(x.double(), -1) for x in ref.logits])
            references.append((name, ids, budget, max_tokens, ref, ref_logp))
        for signal, threshold, max_segment in grid:
            for name, ids, budget, max_tokens, ref, ref_logp in references:
                config = {
                    "budget": budget,
                    "threshold": threshold,
                    "max_segment": max_segment,
                    "pre_rope": signal == "pre",
                }
                session, cache = open_model_session(client, model, "louiskv", config, max_tokens)
                with session:
                    out = decode(model, cache, ids, len(ref.tokens), forced=ref.tokens)
                logp = torch.stack([log_softmax(x.double(), -1) for x in out.logits])
                kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0).mean())
                row = {
                    "case": name,
                    "prompt_tokens": int(ids.shape[1]),
                    "generated": len(ref.tokens),
                    "budget": budget,
                    "signal": signal,
                    "threshold": threshold,
                    "max_segment": max_segment,
                    "top1": round(float((logp.argmax(-1) == ref_logp.argmax(-1)).double().mean()), 4),
                    "kl": round(kl, 5),
                    "rate": round(out.boundaries / len(ref.tokens), 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            save()  # after every whole configuration
    save()
    print(json.dumps({"out": args.out, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
