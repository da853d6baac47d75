"""Spherical k-means for LouisKV's prompt units (arXiv 2510.11292): keys clustered per (layer, KV head).

Kernel: `clustering_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import functools

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Nearest centroid by cosine: x [B, N, D], centroids [B, K, D] -> assign [B, N] int64.

    Ties go to the lowest index; K >= 1 unless N == 0 (LouisKV clustering step).
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("centroids", centroids, rank=3, dtypes=FLOAT_DTYPES)
    check_size("centroids", centroids, 0, x.shape[0], "B of x")
    check_size("centroids", centroids, 2, x.shape[2], "D of x")
    if x.shape[1] > 0 and centroids.shape[1] == 0:
        raise ValueError("centroids: K is 0 but x has points to assign")
    if use_triton(impl, check_same_device(x=x, centroids=centroids)):
        from kvrecall.kernels.clustering_triton import kmeans_assign_triton

        return kmeans_assign_triton(x, centroids)
    return reference.kmeans_assign(x, centroids)


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, k: int, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means: x [B, N, D], assign [B, N] int -> (centroids [B, k, D] f32, counts [B, k] int64).

    Points assigned outside [0, k) (e.g. -1 padding) join no cluster; an empty cluster gets a
    zero centroid and count 0.
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_tensor("assign", assign, rank=2, dtypes=INDEX_DTYPES)
    check_size("assign", assign, 0, x.shape[0], "B of x")
    check_size("assign", assign, 1, x.shape[1], "N of x")
    check_int("k", k, 1)
    check_int("x.shape[2]", x.shape[2], 1)
    if use_triton(impl, check_same_device(x=x, assign=assign)):
        from kvrecall.kernels.clustering_triton import kmeans_update_triton

        return kmeans_update_triton(x, assign, k)
    return reference.kmeans_update(x, assign, k)


def kmeans(
    x: torch.Tensor, k: int, iters: int, seed: int = 0, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spherical k-means: x [B, N, D] -> (centroids [B, K, D] f32, assign [B, N] int64, counts [B, K] int64).

    K = min(k, N). Deterministic: evenly spaced initial points (`seed` rotates them), `iters`
    Lloyd iterations, empty clusters keep their previous centroid (not re-seeded); the
    returned assign is nearest-centroid for the returned centroids and counts are its sizes.
    See `reference.kmeans` (LouisKV, arXiv 2510.11292).
    """
    check_tensor("x", x, rank=3, dtypes=FLOAT_DTYPES)
    check_int("k", k, 1)
    check_int("iters", iters, 0)
    check_int("seed", seed, 0)
    use_triton(impl, x.device)  # validates impl before any work
    return reference.kmeans(
        x,
        k,
        iters,
        seed,
        assign_fn=functools.partial(kmeans_assign, impl=impl),
        update_fn=functools.partial(kmeans_update, impl=impl),
    )
