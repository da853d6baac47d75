"""Spherical k-means steps on the GPU (LouisKV, arXiv 2510.11292: keys clustered into units).

kmeans_assign_triton: x [B, N, D], centroids [B, K, D] -> assign [B, N] int64 (cosine argmax,
ties to the lowest index). kmeans_update_triton: x [B, N, D], assign [B, N], k ->
(centroids [B, k, D] f32, counts [B, k] int64). Both match `reference.kmeans_assign` /
`reference.kmeans_update`; the Lloyd loop itself is `reference.kmeans`, fed these steps.

The assign step is a float32 matrix product in three TF32 passes (float32-level error; on an
H200 it ran ~3x faster than single-pass "ieee" float32) with a running argmax over centroid
blocks. The update is a one-hot matrix product per (problem, cluster block): deterministic,
no atomics, and on tensor cores for 16-bit inputs (0/1 times a 16-bit value is exact).
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference
from kvrecall.kernels._triton import FP32_DOT_PRECISION, native_dot, next_power_of_2


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, out_ptr,
    N, K, D,
    stride_xb, stride_xn, stride_cb, stride_ck, stride_ob,
    EPS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N points of problem b against all K centroids, K in blocks.
    blocks = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    pid_n = tl.program_id(0) % blocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_rows = x_ptr + b * stride_xb + offs_n[:, None].to(tl.int64) * stride_xn
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        c_rows = c_ptr + b * stride_cb + offs_k[:, None].to(tl.int64) * stride_ck
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq_norms = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xs = tl.load(x_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            cs = tl.load(c_rows + offs_d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            cs = cs.to(tl.float32)
            dots = tl.dot(xs.to(tl.float32), tl.trans(cs), dots, input_precision=PRECISION)
            sq_norms += tl.sum(cs * cs, axis=1)
        sims = dots / tl.maximum(tl.sqrt(sq_norms), EPS)[None, :]
        sims = tl.where(k_mask[None, :], sims, float("-inf"))
        block_best = tl.max(sims, axis=1)
        block_k = tl.argmax(sims, axis=1, tie_break_left=True).to(tl.int64) + k0
        better = block_best > best  # strict: an earlier block keeps ties
        best = tl.where(better, block_best, best)
        best_k = tl.where(better, block_k, best_k)
    tl.store(out_ptr + b * stride_ob + offs_n, best_k, mask=n_mask)


@triton.jit
def _update_kernel(
    x_ptr, a_ptr, cent_ptr, count_ptr,
    N, K, D,
    stride_xb, stride_xn, stride_ab,
    NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program: the sums of BLOCK_K clusters over BLOCK_D dims of problem b, N in blocks.
    blocks = tl.cdiv(K, BLOCK_K)
    b = (tl.program_id(0) // blocks).to(tl.int64)
    pid_k = tl.program_id(0) % blocks
    pid_d = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_mask = offs_k < K
    d_mask = offs_d < D
    sums = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    counts = tl.zeros([BLOCK_K], tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        cluster = tl.load(a_ptr + b * stride_ab + offs_n, mask=n_mask, other=-1)
        member = cluster[None, :] == offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        x_rows = x_ptr + b * stride_xb + offs_n[:, None].to(tl.int64) * stride_xn
        xs = tl.load(x_rows + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if NATIVE_DOT:  # 0/1 times a 16-bit value is exact: tensor cores, no rounding
            sums = tl.dot(member.to(xs.dtype), xs, sums)
        else:
            sums = tl.dot(member.to(tl.float32), xs.to(tl.float32), sums, input_precision="ieee")
        counts += tl.sum(member.to(tl.int64), axis=1)
    means = sums / tl.maximum(counts, 1).to(tl.float32)[:, None]
    out_rows = (b * K + offs_k[:, None]) * D
    tl.store(cent_ptr + out_rows + offs_d[None, :], means, mask=k_mask[:, None] & d_mask[None, :])
    if pid_d == 0:
        tl.store(count_ptr + b * K + offs_k, counts, mask=k_mask)


def _block_d(dim: int) -> int:
    return min(128, max(16, next_power_of_2(dim)))  # tl.dot needs every block dim >= 16


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Launch the assign kernel on checked arguments (see `kvrecall.kernels.kmeans_assign`)."""
    batch, num_points, dim = x.shape
    num_clusters = centroids.shape[1]
    assign = torch.empty(batch, num_points, dtype=torch.int64, device=x.device)
    if assign.numel() == 0:
        return assign
    block_n, block_k = 128, 64
    # Wide float32 rows (D > 128) with the default pipelining overflow Hopper's shared memory.
    block_d = 64 if dim > 128 else _block_d(dim)
    grid = (batch * triton.cdiv(num_points, block_n),)
    _assign_kernel[grid](
        x, centroids, assign,
        num_points, num_clusters, dim,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1), assign.stride(0),
        EPS=reference.EPS, PRECISION=FP32_DOT_PRECISION, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=8, num_stages=2,
    )  # fmt: skip
    return assign


def kmeans_update_triton(x: torch.Tensor, assign: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the update kernel on checked arguments (see `kvrecall.kernels.kmeans_update`)."""
    batch, num_points, dim = x.shape
    centroids = torch.empty(batch, k, dim, dtype=torch.float32, device=x.device)
    counts = torch.empty(batch, k, dtype=torch.int64, device=x.device)
    if centroids.numel() == 0:
        return centroids.zero_(), counts.zero_()
    block_k, block_d = 64, _block_d(dim)
    grid = (batch * triton.cdiv(k, block_k), triton.cdiv(dim, block_d))
    _update_kernel[grid](
        x, assign, centroids, counts,
        num_points, k, dim,
        x.stride(0), x.stride(1), assign.stride(0),
        NATIVE_DOT=native_dot(x.dtype), BLOCK_N=64, BLOCK_K=block_k, BLOCK_D=block_d,
    )  # fmt: skip
    return centroids, counts
