"""Part 5: clustering a prompt's keys (LouisKV's retrieval units) against prefilling that prompt.

k-means per layer and KV head over the prompt's keys, ~``unit`` tokens per cluster, a few
Lloyd iterations, then the members grouped by cluster (the unit index the daemon keeps).
Prefill: every layer of the same model over the prompt with causal SDPA, KV written to a cache.

Timed, as shares of that prefill:

* ``kvrecall.kernels.kmeans iters=N``: what the louiskv policy runs (``_cluster``): one call
  over all L * H (layer, head) problems, the policy's cluster size; ``iters`` = the policy's
  default and a few neighbours. ``best_share_of_prefill`` is the policy default's share.
* ``triton`` / ``torch``: the benchmark's earlier path (the benchmark's own assignment kernel
  with L2 distances and a scatter-add update, one layer per call), kept for comparison.

``python -m kvrecall.bench.cluster`` (CPU) is the quality side: k-means of real SmolLM2 keys
per iteration count and precision, scored by the attention mass that unit retrieval recovers
for real queries, beside the FLOPs each setting costs at the 32K Llama-3-8B shape.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import time
from typing import Any

import torch

from kvrecall.bench import kernels
from kvrecall.bench.common import Timing, free_memory, log, time_fn
from kvrecall.bench.model import RandomLlama, rope_tables


def kmeans(
    keys: torch.Tensor, n_clusters: int, iters: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means, batched over heads. keys [n, T, D] -> centroids [n, K, D], member order [n, T].

    Initial centroids are evenly strided keys (no host sync); an empty cluster keeps its centroid.
    The order sorts positions by cluster, so each cluster's members are one contiguous run.
    """
    n, tokens, dim = keys.shape
    stride = tokens // n_clusters
    centroids = keys[:, ::stride][:, :n_clusters].contiguous()
    keys_f32 = keys.float()
    for _ in range(iters):
        assign = kernels.kmeans_assign(keys, centroids, backend=backend)
        sums = torch.zeros((n, n_clusters, dim), device=keys.device, dtype=torch.float32)
        sums.scatter_add_(1, assign[..., None].expand(-1, -1, dim), keys_f32)
        counts = torch.zeros((n, n_clusters), device=keys.device, dtype=torch.float32)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
        means = sums / counts.clamp(min=1)[..., None]
        centroids = torch.where(counts[..., None] > 0, means, centroids.float()).to(keys.dtype)
    assign = kernels.kmeans_assign(keys, centroids, backend=backend)
    return centroids, assign.argsort(dim=1)


def project_kmeans(keys: torch.Tensor, n_clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What louiskv's ``_cluster`` runs: kvrecall.kernels.kmeans, then the members sorted by unit."""
    from kvrecall import kernels as project

    centroids, assign, _ = project.kmeans(keys, n_clusters, iters)
    return centroids, torch.sort(assign, dim=1, stable=True).indices


def kmeans_flops(problems: int, points: int, clusters: int, dim: int, iters: int) -> dict[str, float]:
    """Arithmetic of one clustering: (iters + 1) assignment products of 2 * N * K * D each, and
    iters updates of N * D adds (sort-based; the one-hot product update cost as much as an assign)."""
    assign = 2.0 * problems * points * clusters * dim * (iters + 1)
    update = 1.0 * problems * points * dim * iters
    return {"assign_flops": assign, "update_flops": update, "total_flops": assign + update}


def check_assign(device: torch.device, backend: str) -> str:
    """An assignment on fresh random keys against exact fp32 distances: the chosen centroid must be
    the nearest up to rounding (the Triton kernel accumulates in fp32; the torch reference rounds
    its scores to bf16, so it gets a looser bound)."""
    keys = torch.randn(3, 1000, 128, device=device, dtype=torch.bfloat16)
    centroids = torch.randn(3, 70, 128, device=device, dtype=torch.bfloat16)
    got = kernels.kmeans_assign(keys, centroids, backend=backend)
    dist = torch.cdist(keys.float(), centroids.float())
    best = dist.min(-1).values
    chosen = dist.gather(-1, got[..., None]).squeeze(-1)
    worst = ((chosen - best) / best).max().item()
    tolerance = 1e-3 if backend == "triton" else 2e-2
    return "ok" if worst < tolerance else f"chosen centroid up to {worst:.2e} farther than the nearest"


def check_project_kmeans(device: torch.device) -> str:
    """The project k-means on 16-bit keys against its PyTorch reference path (same semantics)."""
    from kvrecall import kernels as project

    keys = torch.randn(4, 700, 128, device=device).to(torch.bfloat16)
    got = project.kmeans(keys, 40, 3)
    want = project.kmeans(keys, 40, 3, impl="reference")
    agree = (got[1] == want[1]).float().mean().item()
    return "ok" if agree > 0.99 else f"assignments agree with the reference on {100 * agree:.1f}% of points"


def _time_prefill(model: RandomLlama, tokens: int, reps: int) -> tuple[Timing, torch.Tensor]:
    """Time a whole-model prefill of ``tokens`` random embeddings; returns the time and every
    layer's keys [L * Hkv, T, D] (real RoPE'd keys of this model, clustered next)."""
    shape, device = model.shape, model.device
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(torch.arange(tokens, device=device), shape.head_dim)
    cache = torch.empty(
        (shape.n_layers, 2, shape.n_kv_heads, tokens, shape.head_dim), device=device, dtype=torch.bfloat16
    )

    def prefill() -> None:
        h = x
        for layer in range(shape.n_layers):
            h, k, v = model.prefill_layer(layer, h, cos, sin)
            cache[layer, 0].copy_(k[0])
            cache[layer, 1].copy_(v[0])
        model.head(h[-1:])

    timing = time_fn(prefill, device, warmup=1, reps=reps)
    return timing, cache[:, 0].reshape(shape.n_layers * shape.n_kv_heads, tokens, shape.head_dim).clone()


def louiskv_defaults() -> tuple[int, int]:
    """(cluster_size, kmeans_iters) of the louiskv policy's config."""
    from kvrecall.server.policies.louiskv import LouisKVConfig

    config = LouisKVConfig()
    return config.cluster_size, config.kmeans_iters


def bench_clustering(
    model: RandomLlama, tokens: int, unit: int, iters: int, reps: int, backends: list[str]
) -> dict[str, Any]:
    """Clustering time of a ``tokens``-token prompt (all layers and KV heads) vs its prefill time.

    ``unit`` / ``iters`` drive the benchmark's earlier per-layer path (``backends``); the project
    k-means runs with the louiskv policy's own cluster size and iterations (and neighbours).
    """
    shape, device = model.shape, model.device
    n_clusters = max(1, tokens // unit)
    policy_unit, policy_iters = louiskv_defaults()
    policy_clusters = math.ceil(tokens / policy_unit)
    problems = shape.n_layers * shape.n_kv_heads
    out: dict[str, Any] = {
        "tokens": tokens,
        "clusters_per_head": n_clusters,
        "iters": iters,
        "layers": shape.n_layers,
        "kv_heads": shape.n_kv_heads,
        "kmeans": {},
        "louiskv_defaults": {
            "cluster_size": policy_unit,
            "kmeans_iters": policy_iters,
            "clusters_per_head": policy_clusters,
        },
    }

    prefill_t, keys = _time_prefill(model, tokens, reps)
    out["prefill"] = {
        **prefill_t.as_dict(),
        "kv_cache_bytes": shape.kv_bytes(1, tokens),
        "note": "all layers, causal SDPA (fused backends only on GPU), KV written to a cache",
    }
    log(f"  prefill {tokens} tokens: {prefill_t.median_ms:.1f} ms")
    free_memory(device)

    candidates: dict[str, tuple[Any, dict[str, Any]]] = {}
    for project_iters in sorted({1, 2, 3, policy_iters}):
        flops = kmeans_flops(problems, tokens, policy_clusters, shape.head_dim, project_iters)
        candidates[f"kvrecall.kernels.kmeans iters={project_iters}"] = (
            lambda i=project_iters: project_kmeans(keys, policy_clusters, i),
            {
                "iters": project_iters,
                "clusters_per_head": policy_clusters,
                "problems_per_call": problems,
                **flops,
            },
        )
    layer0 = keys[: shape.n_kv_heads]
    for name in backends:

        def per_layer(b: str = name) -> None:
            for _ in range(shape.n_layers):
                kmeans(layer0, n_clusters, iters, b)

        flops = kmeans_flops(problems, tokens, n_clusters, shape.head_dim, iters)
        candidates[name] = (
            per_layer,
            {"iters": iters, "clusters_per_head": n_clusters, "problems_per_call": shape.n_kv_heads, **flops},
        )
    for name, (fn, meta) in candidates.items():
        try:
            timing = time_fn(fn, device, warmup=1, reps=reps if name != "torch" else 1)
        except Exception as exc:
            out["kmeans"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300], **meta}
            continue
        entry = {
            **timing.as_dict(),
            "share_of_prefill": timing.median_ms / prefill_t.median_ms,
            **meta,
            "TFLOPs": meta["total_flops"] / (timing.median_ms * 1e-3) / 1e12,
        }
        if name in ("triton", "torch"):
            entry["check"] = check_assign(device, name)
        else:
            entry["check"] = check_project_kmeans(device)
        out["kmeans"][name] = entry
        log(
            f"  k-means[{name}]: {timing.median_ms:.1f} ms ({100 * entry['share_of_prefill']:.1f}% of prefill, "
            f"{entry['TFLOPs']:.0f} TFLOP/s)"
        )
    default = out["kmeans"].get(f"kvrecall.kernels.kmeans iters={policy_iters}", {})
    measured = [e["median_ms"] for e in out["kmeans"].values() if "median_ms" in e]
    if "median_ms" in default:
        out["best_share_of_prefill"] = default["share_of_prefill"]
        out["share_basis"] = "kvrecall.kernels.kmeans with the louiskv defaults (what the policy runs)"
    elif measured:
        out["best_share_of_prefill"] = min(measured) / prefill_t.median_ms
        out["share_basis"] = "fastest entry measured (the project k-means did not run)"
    return out


# --------------------------------------------------------------------------- quality on real keys (CPU)

QUALITY_TEXT = ("README.md", "DEVELOPERS.md", "docs/ARCHITECTURE.md", "docs/TUNING.md")


def capture_keys_and_queries(tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Run SmolLM2-135M over ``tokens`` tokens of the repository's documentation and return its
    post-RoPE keys [L, H, T, D] and queries [L, Hq, T, D] (float32), with where they came from."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from kvrecall.models.smollm import load_model

    model, tokenizer = load_model()
    root = pathlib.Path(__file__).resolve().parents[2]
    text = "\n\n".join((root / name).read_text() for name in QUALITY_TEXT if (root / name).is_file())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    keys: list[torch.Tensor] = []
    queries: list[torch.Tensor] = []

    def capture(
        module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        queries.append(query[0].detach().float().clone())
        keys.append(key[0].detach().float().clone())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("kvrecall_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("kvrecall_capture")
    try:
        with torch.no_grad():
            model(ids)
    finally:
        model.set_attn_implementation(previous)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    source = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF)",
        "text": list(QUALITY_TEXT),
        "tokens": ids.shape[1],
        "text_commit": commit,
    }
    return torch.stack(keys), torch.stack(queries), source


def retrieval_quality(
    keys: torch.Tensor,
    queries: torch.Tensor,
    centroids: torch.Tensor,
    assign: torch.Tensor,
    first: int,
    last: int,
    budget: int,
) -> dict[str, float]:
    """How well units retrieve what real queries attend to.

    keys [B, T, D] (B = L * H), queries [B, G, Q, D] (the G query heads of each KV head at Q
    late positions), centroids/assign: the clustering of keys[:, first:last]. Per query
    position, units are scored as louiskv does (max over the group of q . centroid) and taken
    under ``budget`` tokens; the score is the share of each query head's attention mass over
    [first, last) that lands on the taken tokens (1.0 = everything it attends to was
    retrieved), averaged. ``oracle`` is the same share for the best ``budget`` tokens.
    """
    from kvrecall import kernels as project

    batch, _, n_queries, dim = queries.shape
    full = torch.einsum("bgqd,btd->bgqt", queries, keys[:, :last]) / math.sqrt(dim)
    mass = torch.softmax(full, dim=-1)[..., first:last]  # attention each region token gets
    sizes = torch.zeros(batch, centroids.shape[1], dtype=torch.int64)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    recall, oracle = [], []
    for q in range(n_queries):
        scores = project.score_units(queries[:, :, q], centroids, sizes > 0, agg="max", impl="reference")
        take = project.select_under_budget(scores, sizes, budget, impl="reference")  # [B, U]
        # A unit taken partially gives its earliest members (louiskv's compaction order).
        order = torch.sort(assign, dim=1, stable=True)
        start = torch.cumsum(sizes, dim=1) - sizes
        rank = torch.arange(assign.shape[1]).expand(batch, -1) - start.gather(1, order.values)
        chosen = torch.zeros_like(assign, dtype=torch.bool)
        chosen.scatter_(1, order.indices, rank < take.gather(1, order.values))
        got = (mass[:, :, q] * chosen[:, None]).sum(-1)
        total = mass[:, :, q].sum(-1).clamp_min(1e-12)
        recall.append((got / total).mean())
        best = mass[:, :, q].topk(min(budget, last - first), dim=-1).values.sum(-1)
        oracle.append((best / total).mean())
    return {
        "attention_recall": float(torch.stack(recall).mean()),
        "oracle_recall": float(torch.stack(oracle).mean()),
    }


def within_cosine(x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor) -> float:
    """Mean cosine between each point and its cluster's centroid."""
    unit_x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    chosen = centroids.gather(1, assign.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    unit_c = chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return float((unit_x * unit_c).sum(-1).mean())


def quality_study(tokens: int, budget: int, n_queries: int, iters_list: list[int]) -> dict[str, Any]:
    """Quality vs iterations and precision on real keys, with the 32K Llama-3-8B FLOP cost of each."""
    from kvrecall import kernels as project

    cluster_size, default_iters = louiskv_defaults()
    keys, queries, source = capture_keys_and_queries(tokens)
    layers, heads, length, dim = keys.shape
    group = queries.shape[1] // heads
    n_sink, window = 16, 64  # louiskv defaults: sinks stay resident, the window is not clustered
    first, last = n_sink, length - window
    x = keys.reshape(layers * heads, length, dim)
    q = queries[:, :, length - n_queries :].reshape(layers, heads, group, n_queries, dim)
    q = q.reshape(layers * heads, group, n_queries, dim)
    k = math.ceil((last - first) / cluster_size)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for iters in iters_list:
            start = time.perf_counter()
            centroids, assign, _ = project.kmeans(x[:, first:last].to(dtype), k, iters, impl="reference")
            seconds = time.perf_counter() - start
            quality = retrieval_quality(x, q, centroids, assign, first, last, budget)
            flops = kmeans_flops(32 * 8, 32768, math.ceil(32768 / cluster_size), 128, iters)
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "iters": iters,
                    "within_cluster_cosine": within_cosine(x[:, first:last], centroids, assign),
                    **quality,
                    "cpu_seconds": round(seconds, 3),
                    "llama8b_32k_tflop": flops["total_flops"] / 1e12,
                }
            )
            log(
                f"  {rows[-1]['dtype']:>8} iters={iters}: cos {rows[-1]['within_cluster_cosine']:.4f}, recall "
                f"{quality['attention_recall']:.4f} (oracle {quality['oracle_recall']:.4f}), "
                f"{rows[-1]['llama8b_32k_tflop']:.1f} TFLOP at 32K"
            )
    return {
        "source": source,
        "shape": {"layers": layers, "kv_heads": heads, "group": group, "head_dim": dim},
        "clustered": [first, last],
        "clusters_per_head": k,
        "cluster_size": cluster_size,
        "budget": budget,
        "queries": f"the last {n_queries} positions' query heads",
        "louiskv_default_iters": default_iters,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrecall.bench.cluster", description=quality_study.__doc__)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--budget", type=int, default=256, help="retrieved tokens per (layer, KV head)")
    p.add_argument("--queries", type=int, default=32, help="late positions whose queries score units")
    p.add_argument("--iters", default="0,1,2,3,4,6,8")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = quality_study(args.tokens, args.budget, args.queries, [int(i) for i in args.iters.split(",")])
    result["command"] = " ".join([sys.executable, "-m", "kvrecall.bench.cluster", *(argv or sys.argv[1:])])
    lines = [
        "| dtype | iters | within-cluster cosine | attention recall | oracle | TFLOP (Llama-3-8B, 32K) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dtype']} | {r['iters']} | {r['within_cluster_cosine']:.4f} | {r['attention_recall']:.4f} | "
        f"{r['oracle_recall']:.4f} | {r['llama8b_32k_tflop']:.1f} |"
        for r in result["rows"]
    ]
    print("\n".join(lines))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
