"""Part 5: clustering a prompt's keys (LouisKV's retrieval units) against prefilling that prompt.

k-means per layer and KV head over the prompt's keys, ~``unit`` tokens per cluster, a few
Lloyd iterations, then the members grouped by cluster (the unit index the daemon keeps).
Prefill: every layer of the same model over the prompt with causal SDPA, KV written to a cache.
"""

from __future__ import annotations

from typing import Any

import torch

from kvrecall.bench import kernels
from kvrecall.bench.common import Timing, free_memory, log, time_fn
from kvrecall.bench.model import RandomLlama, rope_tables


def kmeans(keys: torch.Tensor, n_clusters: int, iters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _project_kmeans() -> Any:
    """kvrecall.kernels.kmeans if the project has one by now (its API is probed, not assumed)."""
    try:
        from kvrecall.kernels import kmeans as module  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(module, "kmeans", None)


def _time_prefill(model: RandomLlama, tokens: int, reps: int) -> tuple[Timing, torch.Tensor]:
    """Time a whole-model prefill of ``tokens`` random embeddings; returns the time and layer 0's
    keys [Hkv, T, D] (real RoPE'd keys of this model, clustered next)."""
    shape, device = model.shape, model.device
    x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(torch.arange(tokens, device=device), shape.head_dim)
    cache = torch.empty((shape.n_layers, 2, shape.n_kv_heads, tokens, shape.head_dim), device=device,
                        dtype=torch.bfloat16)

    def prefill() -> None:
        h = x
        for layer in range(shape.n_layers):
            h, k, v = model.prefill_layer(layer, h, cos, sin)
            cache[layer, 0].copy_(k[0])
            cache[layer, 1].copy_(v[0])
        model.head(h[-1:])

    return time_fn(prefill, device, warmup=1, reps=reps), cache[0, 0].clone()


def bench_clustering(model: RandomLlama, tokens: int, unit: int, iters: int, reps: int,
                     backends: list[str]) -> dict[str, Any]:
    """Clustering time of a ``tokens``-token prompt (all layers and KV heads) vs its prefill time."""
    shape, device = model.shape, model.device
    n_clusters = max(1, tokens // unit)
    out: dict[str, Any] = {"tokens": tokens, "clusters_per_head": n_clusters, "iters": iters,
                           "layers": shape.n_layers, "kv_heads": shape.n_kv_heads, "kmeans": {}}

    prefill_t, keys = _time_prefill(model, tokens, reps)
    out["prefill"] = {**prefill_t.as_dict(), "kv_cache_bytes": shape.kv_bytes(1, tokens),
                      "note": "all layers, causal SDPA (fused backends only on GPU), KV written to a cache"}
    log(f"  prefill {tokens} tokens: {prefill_t.median_ms:.1f} ms")
    free_memory(device)

    candidates = {name: (lambda b=name: kmeans(keys, n_clusters, iters, b)) for name in backends}
    project = _project_kmeans()
    if project is not None:
        candidates["kvrecall.kernels.kmeans"] = lambda: project(keys, n_clusters, iters)
    for name, one_layer in candidates.items():
        def all_layers(fn: Any = one_layer) -> None:
            for _ in range(shape.n_layers):
                fn()

        try:
            timing = time_fn(all_layers, device, warmup=1, reps=reps)
        except Exception as exc:
            out["kmeans"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        entry = {**timing.as_dict(), "share_of_prefill": timing.median_ms / prefill_t.median_ms}
        if name in ("triton", "torch"):
            entry["check"] = check_assign(device, name)
        out["kmeans"][name] = entry
        log(f"  k-means[{name}] {shape.n_layers} layers: {timing.median_ms:.1f} ms "
            f"({100 * entry['share_of_prefill']:.1f}% of prefill)")
    measured = [e["median_ms"] for e in out["kmeans"].values() if "median_ms" in e]
    if measured:
        out["best_share_of_prefill"] = min(measured) / prefill_t.median_ms
    return out
