"""The tensor-parallel correctness check one rank runs (`python -m kvrecall.tp.check`).

Started once per rank (kvrecall.tp.launch.run_ranks, or torchrun) with the daemon address
of each rank. On a tiny random llama (fp32, the same on every rank) it runs:

* exact: louiskv with a budget covering the sequence; the logits must equal the model's own
  full attention (transformers, DynamicCache) at every step;
* small: louiskv with a small budget; the rank records the steps after which it retrieved and
  its daemon's session stats (the caller compares the ranks);
* single (rank 0, --single): the same small-budget session with all heads through the plain
  transformers integration (kvrecall.client.hf) on rank 0's daemon: the single-GPU run the
  tensor-parallel one should reproduce (LouisKV selects per KV head, so with the same
  boundary steps the shards retrieve exactly the single run's tokens).

Writes check-rank{r}.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import KVRecallCache, spec_for, use_kvrecall_attention
from kvrecall.tp.decode import open_tp_session, tp_decode
from kvrecall.tp.group import TPGroup
from kvrecall.tp.model import TPLlama

TINY = dict(
    num_hidden_layers=4,
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=512,
    vocab_size=512,
    max_position_embeddings=4096,
)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """The same random fp32 llama on every rank (built on the CPU from `seed`)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@torch.no_grad()
def full_attention(model, input_ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits of the model's own attention over its full cache."""
    cache = DynamicCache()
    logits = [model(input_ids, cache=cache, use_cache=True).logits[0, -1]]
    tokens: list[int] = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        ids = torch.tensor([[tokens[-1]]], device=input_ids.device)
        logits.append(model(ids, cache=cache, use_cache=True).logits[0, -1])
    return tokens, [x.float().cpu() for x in logits[:steps]]


@torch.no_grad()
def single_kvrecall(model, cache: KVRecallCache, input_ids: torch.Tensor, forced: list[int]):
    """The one-process transformers path: logits per step and the steps after which it retrieved."""
    logits = [model(input_ids, cache=cache, use_cache=True).logits[0, -1]]
    boundary_steps: list[int] = []
    position = input_ids.shape[1]
    for step, token in enumerate(forced[:-1]):
        before = cache.stats.boundaries
        ids = torch.tensor([[token]], device=input_ids.device)
        positions = torch.tensor([[position]], device=input_ids.device)
        out = model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions)
        logits.append(out.logits[0, -1])
        if cache.stats.boundaries > before:
            boundary_steps.append(step)
        position += 1
    cache.session.flush()
    return [x.float().cpu() for x in logits], boundary_steps


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _stats(stats) -> dict[str, Any]:
    fields = ("boundaries", "appends", "tokens", "max_resident_tokens", "tp_rank", "tp_size", "prompt_tokens")
    return {name: int(getattr(stats, name)) for name in fields}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True, help="comma-separated daemon address of each rank")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", help="cpu | cuda (rank r on cuda:r)")
    parser.add_argument("--prompt", type=int, default=160)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--small-budget", type=int, default=16)
    parser.add_argument("--single", action="store_true", help="rank 0 also runs the single-process session")
    args = parser.parse_args(argv)

    group = TPGroup.from_env("nccl" if args.device == "cuda" else "gloo")
    targets = args.targets.split(",")
    if len(targets) != group.size:
        raise SystemExit(f"--targets: {len(targets)} addresses for {group.size} ranks")
    device = torch.device(f"cuda:{group.rank}" if args.device == "cuda" else "cpu")
    hf = tiny_model().to(device)
    ids = torch.randint(0, TINY["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    tokens, reference = full_attention(hf, ids, args.steps)
    model = TPLlama.from_hf(hf, group, device)
    max_tokens = args.prompt + args.steps + 8
    result: dict[str, Any] = {
        "rank": group.rank,
        "world": group.size,
        "device": str(device),
        "tokens": tokens,
    }
    with KVRecallClient(targets[group.rank], f"tp-check-rank{group.rank}") as client:
        for name, budget in (("exact", max_tokens), ("small", args.small_budget)):
            started = time.perf_counter()
            session, cache = open_tp_session(
                client, model, "louiskv", {"budget": budget}, max_tokens, tag=name
            )
            with session:
                run = tp_decode(model, cache, ids, args.steps, forced=tokens)
                stats = session.stats()
            result[name] = {
                "budget": budget,
                "max_logit_diff_vs_full": max_diff(run.logits, reference),
                "boundary_steps": run.boundary_steps,
                "append_steps": run.append_steps,
                "cache_boundaries": cache.stats.boundaries,
                "agreements": cache.detector.agreements,
                "daemon": _stats(stats),
                "seconds": time.perf_counter() - started,
            }
            if name == "small":
                small_logits = run.logits
        if args.single and group.rank == 0:
            session = client.open_session(
                spec_for(hf, max_tokens), "louiskv", {"budget": args.small_budget}, device=device
            )
            use_kvrecall_attention(hf)
            with session:
                cache = KVRecallCache(session)
                logits, boundary_steps = single_kvrecall(hf, cache, ids, tokens)
                stats = session.stats()
            result["single"] = {
                "boundary_steps": boundary_steps,
                "max_logit_diff_vs_tp": max_diff(logits, small_logits),
                "daemon": _stats(stats),
            }
    group.barrier()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"check-rank{group.rank}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}, indent=1))
    group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
