"""The benchmark's kernels, each beside its plain PyTorch reference.

* ``gather_rows``: copy rows ``src[src_idx[i]] -> dst[dst_idx[i]]``; rows whose ``src_idx`` is
  negative are skipped (no bytes move). ``src`` may be pinned host memory: the Triton and CUDA
  kernels read it directly through unified virtual addressing (UVA), so a gather is one kernel
  and one trip over PCIe, with no staging copy.
* ``plan_fetch``: residency planning for a slot table of ``C`` units per head: which selected
  units are already resident, which slots are free, and which unit each free slot must fetch.
* ``kmeans_assign``: nearest-centroid assignment without materialising the distance matrix.

Backends: ``"triton"`` (a CUDA device, or any device under ``TRITON_INTERPRET=1``), ``"cupy"``
(gather only, CUDA only) and ``"torch"`` (the references; the gather reference cannot read
pinned host memory from the GPU, so on a GPU it is only a correctness check).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency of the kernels extra
    HAVE_TRITON = False

try:
    import cupy

    HAVE_CUPY = True
except ImportError:
    HAVE_CUPY = False


def triton_usable(device: torch.device) -> bool:
    """Triton runs compiled on a CUDA device, and on any device under the interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def cupy_usable(device: torch.device) -> bool:
    """CuPy kernels need a CUDA device and an importable cupy."""
    return HAVE_CUPY and device.type == "cuda"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------- gather


def gather_rows_ref(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
                    dst_idx: torch.Tensor | None = None) -> None:
    """Reference gather: ``dst[dst_idx[i]] = src[src_idx[i]]`` for ``src_idx[i] >= 0``.

    src: [n_src, row], dst: [n_dst, row] (same dtype); src_idx, dst_idx: int64 [n].
    Runs where ``src`` lives and copies the rows to ``dst``'s device (the slow, staged way).
    """
    valid = src_idx >= 0
    rows_src = src_idx[valid].to(src.device)
    rows_dst = (dst_idx[valid] if dst_idx is not None
                else torch.arange(src_idx.numel(), device=src_idx.device)[valid])
    dst[rows_dst.to(dst.device)] = src.index_select(0, rows_src).to(dst.device)


if HAVE_TRITON:

    @triton.jit
    def _gather_rows_kernel(src_ptr, src_idx_ptr, dst_ptr, dst_idx_ptr, n_rows,
                            ROW: tl.constexpr, ROWS_PER_PROG: tl.constexpr, HAS_DST_IDX: tl.constexpr):
        # One program moves ROWS_PER_PROG rows; each row is ROW contiguous elements, loaded
        # as wide vectors (rows start 16-byte aligned because ROW * itemsize is a multiple of 16).
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * ROWS_PER_PROG + tl.arange(0, ROWS_PER_PROG)
        in_range = rows < n_rows
        src_rows = tl.load(src_idx_ptr + rows, mask=in_range, other=-1)
        valid = src_rows >= 0
        if HAS_DST_IDX:
            dst_rows = tl.load(dst_idx_ptr + rows, mask=valid, other=0)
        else:
            dst_rows = rows
        cols = tl.arange(0, ROW)
        vals = tl.load(src_ptr + src_rows[:, None] * ROW + cols[None, :], mask=valid[:, None],
                       cache_modifier=".cg")
        tl.store(dst_ptr + dst_rows[:, None] * ROW + cols[None, :], vals, mask=valid[:, None])


_CUPY_GATHER_SRC = r"""
extern "C" __global__ void gather_rows(const int4* __restrict__ src, const long long* __restrict__ src_idx,
                                       int4* __restrict__ dst, const long long* __restrict__ dst_idx,
                                       long long n_rows, int row_vecs, int has_dst_idx) {
    // Each thread moves VPT 16-byte vectors: all loads are issued before the first store, so
    // several PCIe reads per thread are in flight. Consecutive threads take consecutive vectors.
    const int VPT = 4;
    long long first = (long long)blockIdx.x * blockDim.x * VPT + threadIdx.x;
    int4 vals[VPT];
    long long where[VPT];
    #pragma unroll
    for (int u = 0; u < VPT; ++u) {
        long long i = first + (long long)u * blockDim.x;
        long long r = i / row_vecs;
        where[u] = -1;
        if (r < n_rows) {
            long long s = src_idx[r];
            if (s >= 0) {
                long long c = i - r * row_vecs;
                long long d = has_dst_idx ? dst_idx[r] : r;
                vals[u] = src[s * row_vecs + c];
                where[u] = d * row_vecs + c;
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < VPT; ++u) {
        if (where[u] >= 0) dst[where[u]] = vals[u];
    }
}
"""
_CUPY_THREADS = 256
_CUPY_VPT = 4
_cupy_kernel: Any = None


def _cupy_gather_kernel() -> Any:
    global _cupy_kernel
    if _cupy_kernel is None:
        _cupy_kernel = cupy.RawKernel(_CUPY_GATHER_SRC, "gather_rows")
    return _cupy_kernel


def gather_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
                dst_idx: torch.Tensor | None = None, *, backend: str = "triton",
                rows_per_prog: int | None = None, num_warps: int = 4) -> None:
    """Gather rows ``dst[dst_idx[i]] = src[src_idx[i]]``; negative ``src_idx`` entries are skipped.

    src: [n_src, row] contiguous, possibly pinned host memory (read through UVA on a GPU);
    dst: [n_dst, row] contiguous on the compute device, same dtype; src_idx / dst_idx: int64 [n]
    on the compute device (``dst_idx=None`` means row i goes to row i). ``row * itemsize`` must
    be a multiple of 16 bytes; for Triton ``row`` must be a power of two.
    Enqueues on the current stream and never synchronises, so it can be captured in a CUDA graph.
    """
    assert src.dim() == 2 and dst.dim() == 2 and src.shape[1] == dst.shape[1], (src.shape, dst.shape)
    assert src.dtype == dst.dtype and src.is_contiguous() and dst.is_contiguous()
    assert src_idx.dtype == torch.int64 and (dst_idx is None or dst_idx.dtype == torch.int64)
    n_rows, row = src_idx.numel(), src.shape[1]
    row_bytes = row * src.element_size()
    if n_rows == 0:
        return
    if backend == "torch":
        gather_rows_ref(src, src_idx, dst, dst_idx)
    elif backend == "triton":
        assert _is_pow2(row), f"triton gather needs a power-of-two row, got {row}"
        per_prog = rows_per_prog or max(1, min(256, 16384 // row_bytes))
        grid = (triton.cdiv(n_rows, per_prog),)
        _gather_rows_kernel[grid](src, src_idx, dst, dst_idx if dst_idx is not None else src_idx, n_rows,
                                  ROW=row, ROWS_PER_PROG=per_prog, HAS_DST_IDX=dst_idx is not None,
                                  num_warps=num_warps)
    elif backend == "cupy":
        assert row_bytes % 16 == 0, f"cupy gather moves 16-byte vectors; row is {row_bytes} B"
        row_vecs = row_bytes // 16
        total = n_rows * row_vecs
        blocks = (total + _CUPY_THREADS * _CUPY_VPT - 1) // (_CUPY_THREADS * _CUPY_VPT)
        args = (_u64(src.data_ptr()), _u64(src_idx.data_ptr()), _u64(dst.data_ptr()),
                _u64(dst_idx.data_ptr() if dst_idx is not None else 0), cupy.int64(n_rows),
                cupy.int32(row_vecs), cupy.int32(dst_idx is not None))
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(dst.device).cuda_stream)
        with stream:
            _cupy_gather_kernel()((blocks,), (_CUPY_THREADS,), args)
    else:
        raise ValueError(f"unknown gather backend {backend!r}")


def _u64(ptr: int) -> Any:
    """A raw pointer as a kernel argument (8 bytes by value)."""
    return cupy.uint64(ptr)


# --------------------------------------------------------------------------- fetch planning


def plan_fetch_ref(sel: torch.Tensor, slot_tab: torch.Tensor, n_evict: int) -> torch.Tensor:
    """Reference residency plan. Updates ``slot_tab`` in place and returns ``fetch``.

    sel: int64 [N, C] distinct unit ids selected per head; slot_tab: int64 [N, C] the unit held
    by each slot (-1 empty). Slots ``[0, n_evict)`` are first treated as empty (this is how the
    benchmark sets a step-to-step overlap). A selected unit already in a slot stays there; each
    missing unit goes to a free slot (the i-th missing unit to the i-th free slot).
    Returns fetch: int64 [N, C], the unit each slot must fetch now, -1 for none. No host sync.
    """
    tab = slot_tab.clone()
    tab[:, :n_evict] = -1
    eq = sel[:, :, None] == tab[:, None, :]
    hit, keep = eq.any(2), eq.any(1)
    miss, free = ~hit, ~keep
    miss_rank = miss.long().cumsum(1) - 1
    free_rank = free.long().cumsum(1) - 1
    match = miss[:, :, None] & free[:, None, :] & (miss_rank[:, :, None] == free_rank[:, None, :])
    has = match.any(1)
    unit = (match.long() * sel[:, :, None]).sum(1)
    fetch = torch.where(has, unit, -1)
    slot_tab.copy_(torch.where(has, unit, torch.where(keep, tab, -1)))
    return fetch


if HAVE_TRITON:

    @triton.jit
    def _plan_fetch_kernel(sel_ptr, tab_ptr, fetch_ptr, n_evict, C: tl.constexpr):
        # One program per head; C is small (64), so the C x C comparisons live in registers.
        pid = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, C)
        sel = tl.load(sel_ptr + pid * C + offs)
        tab = tl.load(tab_ptr + pid * C + offs)
        tab = tl.where(offs < n_evict, -1, tab)
        eq = (sel[:, None] == tab[None, :]).to(tl.int32)
        hit = tl.max(eq, axis=1)
        keep = tl.max(eq, axis=0)
        miss = 1 - hit
        free = 1 - keep
        miss_rank = tl.cumsum(miss, axis=0) - 1
        free_rank = tl.cumsum(free, axis=0) - 1
        match = (miss[:, None] > 0) & (free[None, :] > 0) & (miss_rank[:, None] == free_rank[None, :])
        has = tl.max(match.to(tl.int32), axis=0) > 0
        unit = tl.sum(tl.where(match, sel[:, None], 0), axis=0)
        fetch = tl.where(has, unit, -1)
        new_tab = tl.where(has, unit, tl.where(keep > 0, tab, -1))
        tl.store(fetch_ptr + pid * C + offs, fetch)
        tl.store(tab_ptr + pid * C + offs, new_tab)


def plan_fetch(sel: torch.Tensor, slot_tab: torch.Tensor, n_evict: int, fetch: torch.Tensor | None = None,
               *, backend: str = "triton") -> torch.Tensor:
    """Residency plan (see ``plan_fetch_ref``); ``fetch`` may be given to write into."""
    assert sel.shape == slot_tab.shape and sel.dim() == 2
    assert sel.dtype == torch.int64 and slot_tab.dtype == torch.int64 and slot_tab.is_contiguous()
    n_heads, slots = sel.shape
    if backend != "triton" or not _is_pow2(slots):
        out = plan_fetch_ref(sel, slot_tab, n_evict)
        if fetch is None:
            return out
        fetch.copy_(out)
        return fetch
    sel = sel.contiguous()
    fetch = fetch if fetch is not None else torch.empty_like(sel)
    _plan_fetch_kernel[(n_heads,)](sel, slot_tab, fetch, n_evict, C=slots, num_warps=4)
    return fetch


# --------------------------------------------------------------------------- k-means assignment


def kmeans_assign_ref(keys: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Reference nearest-centroid assignment.

    keys: [n, T, D]; centroids: [n, K, D] (same dtype). Returns int64 [n, T].
    Distances ``|c|^2 - 2 x.c`` (the ``|x|^2`` term does not change the argmin) as one bf16/fp
    batched matmul: it materialises an [n, T, K] matrix, which is what the Triton kernel avoids.
    """
    c_norm = centroids.float().square().sum(-1)
    scores = torch.baddbmm(c_norm[:, None, :].to(keys.dtype), keys, centroids.transpose(1, 2), alpha=-2)
    return scores.argmin(-1)


if HAVE_TRITON:

    @triton.jit
    def _kmeans_assign_kernel(x_ptr, c_ptr, cn_ptr, out_ptr, T, K,
                              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT_F32: tl.constexpr):
        # Program (m, p): BM keys of problem p against all K centroids, BN at a time, keeping a
        # running minimum of |c|^2 - 2 x.c: the [T, K] distance matrix never reaches memory.
        pid_m = tl.program_id(0)
        prob = tl.program_id(1).to(tl.int64)
        rows = pid_m * BM + tl.arange(0, BM)
        dims = tl.arange(0, D)
        x = tl.load(x_ptr + prob * T * D + rows[:, None] * D + dims[None, :], mask=rows[:, None] < T, other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16 bit patterns in tl.dot: compute in fp32 there
            x = x.to(tl.float32)
        best = tl.full((BM,), float("inf"), tl.float32)
        arg = tl.zeros((BM,), tl.int32)
        for n0 in range(0, K, BN):
            cols = n0 + tl.arange(0, BN)
            c = tl.load(c_ptr + prob * K * D + cols[:, None] * D + dims[None, :], mask=cols[:, None] < K, other=0.0)
            if DOT_F32:
                c = c.to(tl.float32)
            cn = tl.load(cn_ptr + prob * K + cols, mask=cols < K, other=float("inf"))
            scores = cn[None, :] - 2.0 * tl.dot(x, tl.trans(c))
            block_min = tl.min(scores, axis=1)
            block_arg = tl.argmin(scores, axis=1) + n0
            better = block_min < best
            best = tl.where(better, block_min, best)
            arg = tl.where(better, block_arg, arg)
        tl.store(out_ptr + prob * T + rows, arg.to(tl.int64), mask=rows < T)


def kmeans_assign(keys: torch.Tensor, centroids: torch.Tensor, *, backend: str = "triton") -> torch.Tensor:
    """Nearest-centroid assignment (see ``kmeans_assign_ref``); keys [n, T, D] -> int64 [n, T]."""
    n, tokens, dim = keys.shape
    n_clusters = centroids.shape[1]
    if backend != "triton" or not _is_pow2(dim) or dim < 16:
        return kmeans_assign_ref(keys, centroids)
    keys, centroids = keys.contiguous(), centroids.contiguous()
    c_norm = centroids.float().square().sum(-1)
    out = torch.empty((n, tokens), dtype=torch.int64, device=keys.device)
    block_m, block_n = 128, 64
    grid = (triton.cdiv(tokens, block_m), n)
    _kmeans_assign_kernel[grid](keys, centroids, c_norm, out, tokens, n_clusters,
                                D=dim, BM=block_m, BN=block_n, DOT_F32=os.environ.get("TRITON_INTERPRET") == "1",
                                num_warps=8, num_stages=3)
    return out


def check_plan_fetch(device: torch.device, backend: str, heads: int = 37, slots: int = 64) -> str:
    """The plan kernel against its reference on fresh random tables, then the invariant that every
    selected unit is resident afterwards. Returns "ok" or what differed."""
    universe = 4 * slots
    sel = torch.stack([torch.randperm(universe, device=device)[:slots] for _ in range(heads)])
    table = torch.stack([torch.randperm(universe, device=device)[:slots] for _ in range(heads)])
    table[0] = -1
    table_ref = table.clone()
    got = plan_fetch(sel, table, slots // 5, backend=backend)
    want = plan_fetch_ref(sel, table_ref, slots // 5)
    if not (torch.equal(got, want) and torch.equal(table, table_ref)):
        return "plan differs from the reference"
    resident = (sel[:, :, None] == table[:, None, :]).any(-1).all().item()
    return "ok" if resident else "a selected unit is not resident after the plan"
