"""Per-rank decode step time of a random-weight llama through kvrecall (`python -m kvrecall.tp.step_time`).

Started once per rank (kvrecall.tp.launch.run_ranks or torchrun; WORLD_SIZE 1 is the
one-GPU baseline through the same code). The rank builds its shard of a random bf16 model of
Llama-3-8B's shape (--layers to shorten it), prefills --context random tokens through its
session (the daemon of its GPU ingests and clusters the prompt's KV), decodes --warmup +
--steps greedy tokens with louiskv and times each step on its own clock (wall time of the
forward, synchronised: dense layers, the attention over the working set, the all-reduces, the
agreed boundary decision and any append / retrieval round trip). It then times retrievals on
their own (same query: all resident; fresh random query: the worst case) and one all-reduce
of a hidden vector. Writes step-w{world}-rank{r}.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig

from kvrecall.client import KVRecallClient
from kvrecall.tp.check import TINY
from kvrecall.tp.decode import open_tp_session, sync, tp_decode
from kvrecall.tp.group import TPGroup
from kvrecall.tp.model import TPLlama

LLAMA3_8B = dict(
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
SHAPES = {
    "llama3-8b": LLAMA3_8B,
    "tiny": {k: v for k, v in TINY.items() if k not in ("num_hidden_layers", "max_position_embeddings")},
}


def summary_ms(seconds: list[float]) -> dict[str, Any]:
    if not seconds:
        return {"n": 0}
    ms = sorted(s * 1e3 for s in seconds)
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "p10_ms": ms[int(0.1 * (len(ms) - 1))],
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
    }


def _timed(fn, device: torch.device, group: TPGroup, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        group.barrier()
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", required=True, help="comma-separated daemon address of each rank")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", help="cuda (rank r on cuda:r) | cpu (smoke runs)")
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--retrievals", type=int, default=8, help="timed stand-alone retrievals of each kind")
    args = parser.parse_args(argv)

    group = TPGroup.from_env("nccl" if args.device == "cuda" else "gloo")
    targets = args.targets.split(",")
    if len(targets) != group.size:
        raise SystemExit(f"--targets: {len(targets)} addresses for {group.size} ranks")
    device = torch.device(f"cuda:{group.rank}" if args.device == "cuda" else "cpu")
    shape = SHAPES[args.shape]
    config = LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=args.context + 4096)
    started = time.perf_counter()
    model = TPLlama.random(config, group, device, torch.bfloat16)
    build_s = time.perf_counter() - started
    ids = torch.randint(0, config.vocab_size, (1, args.context), device=device)
    total = args.warmup + args.steps
    result: dict[str, Any] = {
        "rank": group.rank,
        "world": group.size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {"name": args.shape, **shape, "layers": args.layers, "dtype": "bfloat16"},
        "rank_heads": {"query": model.shape.num_query_heads, "kv": model.shape.num_kv_heads},
        "context": args.context,
        "policy": {"name": "louiskv", "budget": args.budget},
        "model_build_s": build_s,
    }
    with KVRecallClient(targets[group.rank], f"tp-bench-rank{group.rank}", timeout=300.0) as client:
        session, cache = open_tp_session(
            client,
            model,
            "louiskv",
            {"budget": args.budget},
            args.context + total + 64,
            tag=f"tp{group.size}",
        )
        with session:
            run = tp_decode(model, cache, ids, total + 1)
            timed = range(args.warmup, total)
            boundary, append = set(run.boundary_steps), set(run.append_steps)
            plain = [run.step_seconds[i] for i in timed if i not in boundary and i not in append]
            result["prefill_and_ingest_s"] = run.prefill_seconds
            result["step"] = summary_ms([run.step_seconds[i] for i in timed])
            result["plain_step"] = summary_ms(plain)
            result["boundary_step"] = summary_ms([run.step_seconds[i] for i in timed if i in boundary])
            result["append_step"] = summary_ms([run.step_seconds[i] for i in timed if i in append])
            result["boundary_rate"] = sum(1 for i in timed if i in boundary) / max(1, len(timed))
            result["retrieval_same_query"] = summary_ms(
                _timed(session.boundary, device, group, args.retrievals)
            )

            def fresh() -> None:
                session.query.copy_(torch.randn_like(session.query, dtype=torch.float32))
                session.boundary()

            result["retrieval_fresh_query"] = summary_ms(_timed(fresh, device, group, args.retrievals))
            stats = session.stats()
            result["daemon"] = {
                "boundaries": stats.boundaries,
                "appends": stats.appends,
                "tokens": stats.tokens,
                "tp_rank": stats.tp_rank,
                "tp_size": stats.tp_size,
                "max_resident_tokens": stats.max_resident_tokens,
                "bytes_host_to_device": stats.bytes_host_to_device,
                "host_bytes": stats.host_bytes,
            }
    hidden = torch.randn(1, 1, config.hidden_size, device=device, dtype=torch.bfloat16)
    result["all_reduce_hidden"] = summary_ms(_timed(lambda: group.all_reduce(hidden), device, group, 50))
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step-w{group.size}-rank{group.rank}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    group.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
