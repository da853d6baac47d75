"""Spherical k-means steps on the GPU (LouisKV, arXiv 2510.11292: keys clustered into units).

kmeans_assign_triton: x [B, N, D], centroids [B, K, D] -> assign [B, N] int64 (cosine argmax,
ties to the lowest index). kmeans_update_triton: x [B, N, D], assign [B, N], k ->
(centroids [B, k, D] f32, counts [B, k] int64). Both match `reference.kmeans_assign` /
`reference.kmeans_update`; the Lloyd loop itself is `reference.kmeans`, fed these steps (it
hands the assignment unit centroids rounded to x's dtype, so 16-bit keys meet 16-bit centroids).

Assign: a matrix product with a running argmax over centroid blocks; the [N, K] scores never
reach memory. When x and the centroids share one 16-bit dtype the product is a single
tensor-core pass (16-bit products are exact in float32, so this equals float32 math up to the
order of the sums); otherwise float32 in three TF32 passes. Centroid norms are computed once
per call, and a D <= 256 tile of x is loaded once per program.
FLOPs per call: 2 * B * N * K * D (32K keys, 2048 clusters, D = 128: 17 GFLOP per head).
Update: points sorted by cluster (one stable sort), then each cluster's members summed in
that order: O(N * D) work, deterministic, no atomics. (The one-hot product it replaces cost
as much as an assign step: 2 * B * N * K * D.)
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference
from kvrecall.kernels._triton import FP32_DOT_PRECISION, native_dot, next_power_of_2

_WHOLE_D_BYTES = 256  # x rows up to this many bytes stay in registers for the whole K loop
_UPDATE_CLUSTERS = 8  # clusters summed by one update program, one after the other


@triton.jit(do_not_specialize=["N", "K"])
def _assign_kernel(
    x_ptr, c_ptr, inv_norm_ptr, out_ptr,
    N, K, D,
    stride_xb, stride_xn, stride_cb, stride_ck, stride_ob,
    NATIVE_DOT: tl.constexpr, PRECISION: tl.constexpr, WHOLE_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N points of problem b against all K centroids, K in blocks.
    blocks = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    pid_n = tl.program_id(0) % blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_rows = x_ptr + b * stride_xb + offs_n[:, None].to(tl.int64) * stride_xn
    offs_d0 = tl.arange(0, BLOCK_D)
    if WHOLE_D:  # the program's points stay in registers for every centroid block
        x_whole = tl.load(x_rows + offs_d0[None, :], mask=n_mask[:, None] & (offs_d0 < D)[None, :], other=0.0)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        c_rows = c_ptr + b * stride_cb + offs_k[:, None].to(tl.int64) * stride_ck
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            d_mask = offs_d < D
            if WHOLE_D:
                xs = x_whole
            else:
                xs = tl.load(x_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            cs = tl.load(c_rows + offs_d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            if NATIVE_DOT:  # one 16-bit tensor-core pass, float32 accumulation
                dots = tl.dot(xs, tl.trans(cs), dots)
            else:
                dots = tl.dot(xs.to(tl.float32), tl.trans(cs.to(tl.float32)), dots, input_precision=PRECISION)
        inv_norm = tl.load(inv_norm_ptr + b * K + offs_k, mask=k_mask, other=0.0)
        sims = tl.where(k_mask[None, :], dots * inv_norm[None, :], float("-inf"))
        block_best, block_k = tl.max(sims, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = block_best > best  # strict: an earlier block keeps ties
        best = tl.where(better, block_best, best)
        best_k = tl.where(better, block_k.to(tl.int32) + k0, best_k)
    tl.store(out_ptr + b * stride_ob + offs_n, best_k.to(tl.int64), mask=n_mask)


@triton.jit(do_not_specialize=["N", "K"])
def _update_kernel(
    x_ptr, order_ptr, bounds_ptr, cent_ptr,
    N, K, D,
    stride_xb, stride_xn,
    CLUSTERS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: CLUSTERS consecutive clusters of problem b. Cluster c's members are
    # order[b, bounds[b, c] : bounds[b, c + 1]] (points sorted by cluster), summed CHUNK at a time.
    blocks = tl.cdiv(K, CLUSTERS)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    first = (tl.program_id(0) % blocks) * CLUSTERS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for j in range(CLUSTERS):
        c = first + j
        if c < K:
            start = tl.load(bounds_ptr + b * (K + 1) + c)
            end = tl.load(bounds_ptr + b * (K + 1) + c + 1)
            sums = tl.zeros([CHUNK, BLOCK_D], tl.float32)
            for i0 in range(start, end, CHUNK):
                offs_i = i0 + tl.arange(0, CHUNK)
                i_mask = offs_i < end
                point = tl.load(order_ptr + b * N + offs_i, mask=i_mask, other=0).to(tl.int64)
                rows = x_ptr + b * stride_xb + point[:, None] * stride_xn + offs_d[None, :]
                sums += tl.load(rows, mask=i_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            count = tl.maximum(end - start, 1).to(tl.float32)
            tl.store(cent_ptr + (b * K + c) * D + offs_d, tl.sum(sums, axis=0) / count, mask=d_mask)


def _assign_blocks(dim: int, element_size: int) -> tuple[int, bool]:
    """(BLOCK_D, whole): the D tile, and whether one tile holds all of D (x loaded once).

    tl.dot needs every block dim >= 16; rows of up to 256 bytes stay whole, wider ones go in
    64-element steps (wide float32 tiles with pipelining overflow Hopper's shared memory).
    """
    block_d = max(16, next_power_of_2(dim))
    if block_d * element_size <= _WHOLE_D_BYTES:
        return block_d, True
    return 64, False


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Launch the assign kernel on checked arguments (see `kvrecall.kernels.kmeans_assign`)."""
    batch, num_points, dim = x.shape
    num_clusters = centroids.shape[1]
    assign = torch.empty(batch, num_points, dtype=torch.int64, device=x.device)
    if assign.numel() == 0:
        return assign
    inv_norm = 1.0 / centroids.float().norm(dim=-1).clamp_min(reference.EPS)  # [B, K], once per call
    native = native_dot(x.dtype, centroids.dtype)
    block_d, whole = _assign_blocks(dim, x.element_size() if native else 4)
    block_n, block_k = 128, 128 if native and block_d <= 128 else 64
    grid = (batch * triton.cdiv(num_points, block_n),)
    _assign_kernel[grid](
        x, centroids, inv_norm, assign,
        num_points, num_clusters, dim,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1), assign.stride(0),
        NATIVE_DOT=native, PRECISION=FP32_DOT_PRECISION, WHOLE_D=whole,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=8, num_stages=3 if native else 2,
    )  # fmt: skip
    return assign


def sort_by_cluster(assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """assign [B, N] -> (order [B, N] int64, bounds [B, k + 1] int64): the points sorted by
    cluster (stable: ascending index within a cluster), cluster c's members being
    order[b, bounds[b, c] : bounds[b, c + 1]]. Points outside [0, k) fall outside every range."""
    keys = assign.to(torch.int32) if k < (1 << 31) - 1 else assign  # fewer radix passes
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    clusters = torch.arange(k + 1, dtype=keys.dtype, device=assign.device)
    bounds = torch.searchsorted(sorted_keys, clusters.expand(assign.shape[0], k + 1).contiguous())
    return order, bounds


def kmeans_update_triton(x: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the update kernel on checked arguments (see `kvrecall.kernels.kmeans_update`)."""
    batch, num_points, dim = x.shape
    centroids = torch.empty(batch, k, dim, dtype=torch.float32, device=x.device)
    if centroids.numel() == 0:
        return centroids, torch.zeros(batch, k, dtype=torch.int64, device=x.device)
    order, bounds = sort_by_cluster(assign, k)
    grid = (batch * triton.cdiv(k, _UPDATE_CLUSTERS),)
    _update_kernel[grid](
        x, order, bounds, centroids,
        num_points, k, dim,
        x.stride(0), x.stride(1),
        CLUSTERS=_UPDATE_CLUSTERS, CHUNK=16, BLOCK_D=next_power_of_2(dim),
        num_warps=2,
    )  # fmt: skip
    return centroids, bounds[:, 1:] - bounds[:, :-1]
