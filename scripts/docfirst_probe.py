"""What a policy keeps of the needle when the question comes after its document (docs/TUNING.md
cites it): for each document-first sample, the document is ingested alone, the question fed as
one chunk, then greedy decoding, under each named variant; after the chunk (the retrieval its
queries asked for has happened) it counts how many of the needle's tokens each (layer, KV head)
row of the working set holds.

    python scripts/docfirst_probe.py --lengths 2048 --seeds 0 \\
        --variant full=full --variant 'before=louiskv:{"budget": 512, "chunk_select": "units"}' \\
        --variant 'after=louiskv:{"budget": 512}' --out probe.json

Prints one line per sample and variant (score, retrievals, the needle's residency) and a total
per variant; --out writes the same as JSON. Variants share each sample's prefill.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import KVRecallCache
from kvrecall.eval.cells import N_SINK, WINDOW
from kvrecall.eval.runner import Runner
from kvrecall.eval.tasks import document_first, make_sample, score
from kvrecall.local import LocalDaemon
from kvrecall.models.smollm import load_model, load_tokenizer


class ChunkSnapshot:
    """Wraps KVRecallCache._end_chunk to copy the working set's positions once the chunk has
    attended (its retrieval done), before the chunk is handed over."""

    def __init__(self) -> None:
        self.slot_pos: torch.Tensor | None = None
        original = KVRecallCache._end_chunk

        def end_chunk(cache: KVRecallCache, num_tokens: int) -> None:
            self.slot_pos = cache.session.slot_pos.clone()
            original(cache, num_tokens)

        KVRecallCache._end_chunk = end_chunk


def needle_tokens(tokenizer, document: str, needle: str) -> tuple[int, int] | None:
    """Token span [a, b) of `needle`'s characters in `document`."""
    at = document.find(needle)
    if at < 0:
        return None
    offsets = tokenizer(document, return_offsets_mapping=True).offset_mapping
    inside = [i for i, (a, b) in enumerate(offsets) if a < at + len(needle) and b > at]
    return inside[0], inside[-1] + 1


def parse_variant(text: str) -> tuple[str, str, dict | None]:
    """'name=policy[:json]' -> (name, policy, config with the eval's sinks and window)."""
    name, _, spec = text.partition("=")
    policy, _, raw = spec.partition(":")
    if policy == "full":
        return name, policy, None
    return name, policy, {"n_sink": N_SINK, "window": WINDOW, **json.loads(raw or "{}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="niah_single,niah_multikey,qa")
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variant", action="append", required=True, help="name=policy[:json config]")
    parser.add_argument("--out")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    tokenizer = load_tokenizer()
    model, _ = load_model(device="cpu")
    snapshot = ChunkSnapshot()
    rows = []
    with LocalDaemon(host_pool_gb=2, device_pool_gb=2, device="cpu") as daemon, KVRecallClient(
        daemon.target, "docfirst-probe"
    ) as client:
        runner = Runner(model, tokenizer, client)
        for seed in map(int, args.seeds.split(",")):
            for depth in map(float, args.depths.split(",")):
                for length in map(int, args.lengths.split(",")):
                    for task in args.tasks.split(","):
                        sample = document_first(make_sample(task, length, seed=seed, depth=depth, tokenizer=tokenizer))
                        document = sample.prompt[: sample.question_at]
                        prefill = runner.prefill(document)
                        question = tokenizer(
                            sample.prompt[sample.question_at :], add_special_tokens=False, return_tensors="pt"
                        ).input_ids
                        span = needle_tokens(tokenizer, document, sample.meta.get("needle", ""))
                        for name, policy, config in variants:
                            started = time.perf_counter()
                            out = runner.decode_cell(prefill, policy, config, sample.max_new_tokens, question=question)
                            text = tokenizer.decode(out.tokens, skip_special_tokens=True)
                            row = {
                                "variant": name, "task": task, "length": length, "seed": seed, "depth": depth,
                                "score": score(sample, text), "answer": text.strip(), "steps": len(out.tokens),
                                "boundaries": out.boundaries,
                            }  # fmt: skip
                            if span is not None and snapshot.slot_pos is not None:
                                a, b = span
                                held = ((snapshot.slot_pos >= a) & (snapshot.slot_pos < b)).sum(-1).float() / (b - a)
                                row.update(
                                    needle_share=round(float(held.mean()), 4),
                                    rows_whole=round(float((held == 1).float().mean()), 4),
                                    rows_none=round(float((held == 0).float().mean()), 4),
                                )
                            snapshot.slot_pos = None
                            rows.append(row)
                            print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)
    totals = {}
    for name, _, _ in variants:
        mine = [r for r in rows if r["variant"] == name]
        totals[name] = {
            "score": sum(r["score"] for r in mine), "n": len(mine),
            "retrievals_per_token": round(sum(r["boundaries"] for r in mine) / max(1, sum(r["steps"] for r in mine)), 4),
            **{
                k: round(sum(r[k] for r in mine if k in r) / max(1, sum(k in r for r in mine)), 4)
                for k in ("needle_share", "rows_whole", "rows_none")
            },
        }  # fmt: skip
    print(json.dumps(totals, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "totals": totals, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
