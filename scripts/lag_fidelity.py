"""What the batched engine's lag costs in accuracy, on the bundled real model (SmolLM2-135M).

A slot that crosses a boundary reads a shadow of its working set for `lag` steps while the
daemon retrieves (kvrecall/engine/engine.py). This replays full KV's greedy continuation of a
long document teacher-forced through `Engine` (louiskv, deferred eviction, the device's own
boundary flag: the real model's rate) at each lag, and reports per lag the top-1 agreement
with full attention and the mean KL(full || engine), with the boundaries taken and what the
retrievals moved: `moved_share`, the bytes the daemon moved host to device per retrieval over
a whole budget's worth (every retrieved token new). `kvrecall bench e2e`'s random weights
choose a fresh set each time (123 of 128 MiB at 32K x 8, 0.96); this is the real model's. The documents
of one lag decode together, one slot each (a batch decodes like its sequences alone).

`--variants` replays each lag against daemons set otherwise: `default`, and
`select-before-close` (the daemon's select_before_close diagnostic: a boundary selects before
the open output segment closes, what a selection run by the worker over its mapped unit table
would choose without a close kernel of the daemon's first; DEVELOPERS.md), and
`worker-selection` (the daemon's worker_selection: the engine chooses each retrieval over its
mapped unit table and open segment, the daemon places it), and `fp8-reps` (the daemon's
unit_reps_dtype fp8: louiskv's unit table stores its representatives in float8 e4m3).

    python scripts/lag_fidelity.py --out FILE [--lags 0,4,5,8] [--doc-tokens 2048] [--tokens 1000]
                                   [--docs 1] [--budget 512] [--device cpu|cuda]
                                   [--variants default,select-before-close]

Prints a table and writes JSON with the date, host and command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime

import torch
from torch.nn.functional import log_softmax

VARIANTS = {
    "default": {},
    "select-before-close": {"KVRECALL_SELECT_BEFORE_CLOSE": "1"},
    "fp8-reps": {"KVRECALL_UNIT_REPS_DTYPE": "fp8"},
    # the worker chooses each retrieval over its mapped table (kvrecall/client/selection.py)
    "worker-selection": {"KVRECALL_WORKER_COPY_SHARE": "1", "KVRECALL_WORKER_SELECTION": "1"},
}


def reference(model, ids: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Full KV's greedy continuation of `ids` (n tokens) and its log-probabilities [n, V] (one
    forward pass over prompt + tokens: exact full attention)."""
    out = model(input_ids=ids, use_cache=True)
    past, token = out.past_key_values, int(out.logits[0, -1].argmax())
    tokens = [token]
    while len(tokens) < n:
        out = model(input_ids=torch.tensor([[token]], device=ids.device), past_key_values=past, use_cache=True)
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        tokens.append(token)
    forced = torch.tensor([tokens[:-1]], device=ids.device)
    logits = model(input_ids=torch.cat([ids, forced], dim=1), use_cache=False, logits_to_keep=n).logits[0]
    return tokens, log_softmax(logits.double(), -1).cpu()


def replay(client, model, weights, docs: list[tuple[torch.Tensor, list[int], torch.Tensor]], lag: int,
           budget: int, device: str) -> list[dict]:  # fmt: skip
    """Each document (ids [1, T], full's tokens, full's log-probabilities) in its own slot of one
    engine at `lag`, teacher-forced on full's tokens -> a row per document."""
    from kvrecall.client.hf import spec_for
    from kvrecall.engine import Engine

    n = len(docs[0][1])
    sessions = [client.open_session(spec_for(model, ids.shape[1] + n + 64), "louiskv", {"budget": budget},
                                    device=device, deferred_eviction=True) for ids, _, _ in docs]  # fmt: skip
    engine = Engine(weights, batch=len(docs), max_capacity=max(s.capacity for s in sessions), use_graph=False, lag=lag)
    try:
        slots = [engine.add(session, ids[0]) for session, (ids, _, _) in zip(sessions, docs, strict=True)]
        forced = torch.tensor([tokens for _, tokens, _ in docs], device=engine.device)  # [docs, n]
        engine.decoder.tokens[slots] = forced[:, 0]
        logits = []
        for i in range(1, n):  # step i: input tokens[i - 1], predicts tokens[i]
            engine.step()
            logits.append(engine.decoder.logits[slots].double().cpu())
            engine.decoder.tokens[slots] = forced[:, i]
        seqs = [engine.remove(slot) for slot in slots]
        moved = sum(engine.times.moved_bytes)  # per retrieving call (lag >= 1: taken at the switch back)
    finally:
        engine.close()
        for session in sessions:
            session.close()
    rows = []
    for d, ((_, _, ref), seq) in enumerate(zip(docs, seqs, strict=True)):
        logp = log_softmax(torch.stack([step[d] for step in logits]), -1)
        want = ref[1:]
        kl = (want.exp() * (want - logp)).sum(-1).clamp_min(0)
        rows.append({
            "doc": d, "prompt_tokens": int(docs[d][0].shape[1]), "lag": lag, "n": n - 1,
            "agree": int((logp.argmax(-1) == want.argmax(-1)).sum()),
            "top1": round(float((logp.argmax(-1) == want.argmax(-1)).double().mean()), 5),
            "kl_mean": round(float(kl.mean()), 6), "kl_max": round(float(kl.max()), 4),
            "boundaries": seq.boundaries, "boundary_rate": round(seq.boundaries / max(1, seq.steps), 4),
        })  # fmt: skip
    shape = weights.shape
    whole = budget * shape.num_layers * shape.num_kv_heads * 2 * shape.head_dim * weights.dtype.itemsize
    retrievals = sum(seq.boundaries for seq in seqs)
    for row in rows:  # the engine's retrievals together (two slots may share a call)
        row["moved_share"] = round(moved / max(1, retrievals * whole), 4) if lag > 0 else None
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lags", default="0,4,5,8")
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=1000, help="replayed tokens per document")
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--device", default="cpu", help="the model, the engine and the daemon's device (cpu, cuda)")
    p.add_argument("--variants", default="default", help="daemon settings replayed: " + ", ".join(VARIANTS))
    p.add_argument("--out", default="lag-fidelity.json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    from kvrecall.client import KVRecallClient
    from kvrecall.engine import DecoderWeights
    from kvrecall.eval.tasks import longdoc
    from kvrecall.local import LocalDaemon
    from kvrecall.models.pretrained import load

    loaded = load(None, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = DecoderWeights.from_hf(model)
    lags = [int(x) for x in args.lags.split(",")]
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    rows = []
    started = time.perf_counter()
    docs = []
    for seed in range(args.docs):
        prompt = longdoc(args.doc_tokens, seed=seed, tokenizer=tokenizer).prompt
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(args.device)
        docs.append((ids, *reference(model, ids, args.tokens)))
    lazy = ["--warmup", ""]  # kernels compile at first use (the warm-up's minutes buy nothing here)
    for variant in variants:
        with LocalDaemon(host_pool_gb=2.0 * args.docs, device_pool_gb=1.0 * args.docs, device=args.device,
                         extra_args=lazy, env=VARIANTS[variant]) as daemon, \
                KVRecallClient(daemon.target, "lag-study") as client:  # fmt: skip
            for lag in lags:
                for row in replay(client, model, weights, docs, lag, args.budget, args.device):
                    row["variant"] = variant
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    summary = {}
    for variant in variants:
        for lag in lags:
            mine = [r for r in rows if r["lag"] == lag and r["variant"] == variant]
            n = sum(r["n"] for r in mine)
            key = str(lag) if variants == ["default"] else f"{variant}/{lag}"
            summary[key] = {"top1": round(sum(r["agree"] for r in mine) / n, 5), "n": n,
                            "kl_mean": round(sum(r["kl_mean"] * r["n"] for r in mine) / n, 6),
                            "boundary_rate": round(sum(r["boundaries"] for r in mine) / n, 4),
                            "moved_share": mine[0]["moved_share"]}  # fmt: skip
    print(f"{'variant/lag':>24} {'top-1':>8} {'KL mean':>10} {'boundaries':>11} {'n':>6} {'moved share':>12}")
    for key, s in summary.items():
        print(f"{key:>24} {s['top1']:8.4f} {s['kl_mean']:10.6f} {s['boundary_rate']:11.4f} {s['n']:6d} "
              f"{s['moved_share']!s:>12}")
    doc = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
           "host": platform.node(), "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "model": loaded.name, "policy": "louiskv",
           "budget": args.budget, "seconds": round(time.perf_counter() - started, 1), "summary": summary,
           "rows": rows}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
