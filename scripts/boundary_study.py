"""Offline study of LouisKV's boundary signal on the bundled model (docs/TUNING.md cites it).

Generates tokens greedily with full KV, records every decode step's per-layer queries, then
replays the worker's boundary rule offline for several signal variants and thresholds:

* ``post``: cosine of the post-RoPE queries (what the attention function sees);
* ``pre``: cosine of the queries with RoPE undone (position-free: only the content moves it);
aggregated over layers by ``mean`` or ``min`` (per layer: mean over query heads).

It prints, per variant, the boundary rate (boundaries per generated token) at each threshold,
and writes JSON. The rate only depends on the queries, and under a policy that tracks full
attention closely the queries are the full-KV ones, so the replay is faithful; the accuracy
side of the trade-off is measured through the daemon by `kvrecall eval` (fidelity).

    python scripts/boundary_study.py --tokens 256 --prompts 2 --out bench/results/boundary-study.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvrecall.client.hf import undo_rope
from kvrecall.eval.harness import FIDELITY_PROMPTS
from kvrecall.eval.tasks import chat_prompt, make_sample
from kvrecall.models.smollm import load_model

THRESHOLDS = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
_RECORD: list[torch.Tensor] = []


def _recording_attention(module, query, key, value, attention_mask, **kwargs):
    if query.shape[2] == 1:
        _RECORD.append(query[0, :, 0].detach().float().clone())  # [Hq, D], post-RoPE
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def unrope(model, q: torch.Tensor, position: int) -> torch.Tensor:
    """Undo the rotary embedding of q [L, Hq, D] at `position`."""
    cos, sin = model.model.rotary_emb(q, torch.tensor([[position]]))  # [1, 1, D]
    return undo_rope(q, cos[0, 0].float(), sin[0, 0].float())


def record(model, tokenizer, text: str, tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy full-KV generation; returns queries [steps, L, Hq, D] and the prompt length."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    _RECORD.clear()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    L = model.config.num_hidden_layers
    q = torch.stack(_RECORD).view(-1, L, *_RECORD[0].shape)
    return q, ids.shape[1]


def simulate(signal_q: torch.Tensor, threshold: float, aggregate: str) -> list[int]:
    """The worker's rule: boundary when agg(sim(q_t, q_ref)) < threshold; ref resets there.
    signal_q: [steps, L, Hq, D]. Step 0's reference is the last prompt query (we use step 0)."""
    ref = signal_q[0]
    hits = []
    for t in range(1, signal_q.shape[0]):
        sim = F.cosine_similarity(signal_q[t], ref, dim=-1, eps=1e-6).mean(dim=-1)  # [L]
        score = float(sim.min() if aggregate == "min" else sim.mean())
        if score < threshold:
            hits.append(t)
            ref = signal_q[t]
    return hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument(
        "--long-input",
        type=int,
        default=2048,
        help="also one long-input sample of this many tokens (0: none)",
    )
    ap.add_argument("--out", default="bench/results/boundary-study.json")
    args = ap.parse_args(argv)
    started = time.time()
    model, tokenizer = load_model()
    AttentionInterface.register("kvrecall_record", _recording_attention)
    model.set_attn_implementation("kvrecall_record")
    texts = [("fidelity", chat_prompt(p, "")) for p in FIDELITY_PROMPTS[: args.prompts]]
    if args.long_input:
        sample = make_sample("qa", args.long_input, 0, tokenizer=tokenizer)
        texts.append(("long_input_qa", sample.prompt))
    rows = []
    for kind, text in texts:
        q_post, n_prompt = record(model, tokenizer, text, args.tokens)
        q_pre = torch.stack([unrope(model, q_post[t], n_prompt + t) for t in range(q_post.shape[0])])
        for variant, q in (("post", q_post), ("pre", q_pre)):
            for aggregate in ("mean", "min"):
                consecutive = F.cosine_similarity(q[1:], q[:-1], dim=-1).mean(dim=-1)  # [steps-1, L]
                rates = {}
                for th in THRESHOLDS:
                    rates[str(th)] = len(simulate(q, th, aggregate)) / (q.shape[0] - 1)
                rows.append(
                    {
                        "kind": kind,
                        "prompt_tokens": n_prompt,
                        "variant": variant,
                        "aggregate": aggregate,
                        "consecutive_similarity_mean": float(consecutive.mean()),
                        "rate": rates,
                    }
                )
                print(
                    f"{kind:14s} {variant:4s} {aggregate:4s} "
                    + " ".join(f"{th}:{r:.2f}" for th, r in rates.items())
                )
    out = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor()} cpu, torch {torch.__version__}",
        "command": "python " + " ".join(sys.argv),
        "tokens": args.tokens,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps({"out": args.out, "seconds": out["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
