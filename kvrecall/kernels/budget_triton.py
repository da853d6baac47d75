"""Greedy selection under a token budget on the GPU (LouisKV, arXiv 2510.11292; Quest pages too).

select_under_budget_triton: scores [B, U] float, sizes [B, U] int, budget -> take [B, U] int64:
units visited by descending score (ties: lower index first) each take min(size, budget left);
units scoring -inf (or NaN) take nothing. Matches `reference.select_under_budget`.

One program takes one row in registers, without a sort: each score becomes an order-preserving
integer key, a 32-step binary search over the key range finds the greedy rule's last key t (the
largest with sum(size of units keyed >= t) >= budget); units above t take all, units at t take
what is left in index order (a prefix sum), units below nothing. The sort this replaced (a
4096-wide bitonic sort per row) took 0.2 ms per 32K retrieval on an H200 (issue #17). Rows longer
than MAX_UNITS (a 64K-token prompt at 16 tokens a cluster: 128K x 8 on an H200 ran the reference's
sort, scan and scatter, ~0.3 ms of the daemon's kernels a retrieval) take `_select_chunked_kernel`:
the same search, SEARCH_WAYS ways a pass (thresholds compared a chunk at a time from memory: the row,
8 bytes a unit, stays in the SM's cache), then one pass that carries the ties' prefix sum across chunks.
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

MAX_UNITS = 4096
SMALL_UNITS = 256
# Ways of the chunked kernel's search a pass over the row (a power of two dividing 2 ** 32's exponent:
# 2, 4, 16 or 256). On an H200 (scripts/select_probe.py, 2026-12-04) 4 ways took 0.094 / 0.25 ms for
# 256 rows of 8,192 / 16,384 units against 0.131 / 0.26 for the binary search (2) and 0.15 / 0.41 for
# 16 (its [chunk, 16] compares cost more than the passes they save); 0.62 against 1.03 ms at 2,048 rows.
SEARCH_WAYS = 4


@triton.jit
def _keyed(scores_ptr, sizes_ptr, offs, in_row):
    """The units at `offs` of a row: order-preserving integer keys of their scores and their
    sizes (int64), both kernels' view of a row."""
    scores = tl.load(scores_ptr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
    size = tl.load(sizes_ptr + offs, mask=in_row, other=0).to(tl.int64)
    size = tl.where(scores > float("-inf"), tl.maximum(size, 0), 0)  # -inf, NaN, padding: nothing
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 ties +0.0, as the reference's compare does
    bits = scores.to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64), size  # float order == signed int order


@triton.jit(do_not_specialize=["U", "budget", "stride_sb", "stride_zb"])
def _select_kernel(
    scores_ptr, sizes_ptr, take_ptr,
    U, budget,
    stride_sb, stride_zb,
    BLOCK_U: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_U)
    in_row = offs < U
    key, size = _keyed(scores_ptr + b * stride_sb, sizes_ptr + b * stride_zb, offs, in_row)
    # Invariant: sum(size[key >= lo]) >= budget (or lo is the lowest key), sum(size[key >= hi]) < budget.
    lo = tl.full((), -(2**31), tl.int64)
    hi = tl.full((), 2**31, tl.int64)
    for _ in range(32):
        mid = (lo + hi) >> 1
        enough = tl.sum(tl.where(key >= mid, size, 0), axis=0) >= budget
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    above = key > lo
    left = budget - tl.sum(tl.where(above, size, 0), axis=0)
    tied = tl.where(key == lo, size, 0)
    before = tl.cumsum(tied, axis=0) - tied  # ties: lower index first
    take = tl.where(above, size, tl.minimum(tied, tl.maximum(left - before, 0)))
    tl.store(take_ptr + b * U + offs, take, mask=in_row)


@triton.jit(do_not_specialize=["U", "budget", "stride_sb", "stride_zb"])
def _select_chunked_kernel(
    scores_ptr, sizes_ptr, take_ptr,
    U, budget,
    stride_sb, stride_zb,
    CHUNK: tl.constexpr, LOG_WAYS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    scores_ptr += b * stride_sb
    sizes_ptr += b * stride_zb
    offs = tl.arange(0, CHUNK)
    lo = tl.full((), -(2**31), tl.int64)
    # 2 ** LOG_WAYS ways a pass (4: 16 ways, 8 passes): thresholds lo + j * width, j < WAYS; lo moves
    # to the last one whose units reach the budget (the sums fall as the thresholds rise) (in 32 bits:
    # keys are, every threshold is below 2 ** 31, and a row's sizes sum to its tokens)
    ways = tl.arange(0, 1 << LOG_WAYS).to(tl.int64)
    for step in range(32 // LOG_WAYS):
        shift = 32 - (step + 1) * LOG_WAYS  # the sub-interval's width is 1 << shift
        thresholds = (lo + (ways << shift)).to(tl.int32)
        sums = tl.zeros((1 << LOG_WAYS,), tl.int32)
        for start in range(0, U, CHUNK):
            key, size = _keyed(scores_ptr, sizes_ptr, start + offs, start + offs < U)
            key, size = key.to(tl.int32), size.to(tl.int32)
            sums += tl.sum(tl.where(key[:, None] >= thresholds[None, :], size[:, None], 0), axis=0)
        lo += tl.sum(((sums >= budget) & (ways > 0)).to(tl.int64), axis=0) << shift
    above_sum = tl.zeros((), tl.int64)
    for start in range(0, U, CHUNK):
        key, size = _keyed(scores_ptr, sizes_ptr, start + offs, start + offs < U)
        above_sum += tl.sum(tl.where(key > lo, size, 0), axis=0)
    left = budget - above_sum
    carried = tl.zeros((), tl.int64)  # tied tokens of the chunks before
    for start in range(0, U, CHUNK):
        in_row = start + offs < U
        key, size = _keyed(scores_ptr, sizes_ptr, start + offs, in_row)
        tied = tl.where(key == lo, size, 0)
        before = carried + tl.cumsum(tied, axis=0) - tied  # ties: lower index first
        take = tl.where(key > lo, size, tl.minimum(tied, tl.maximum(left - before, 0)))
        tl.store(take_ptr + b * U + start + offs, take, mask=in_row)
        carried += tl.sum(tied, axis=0)


def select_under_budget_triton(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.select_under_budget`)."""
    batch, num_units = scores.shape
    take = torch.empty(batch, num_units, dtype=torch.int64, device=scores.device)
    if take.numel() == 0:
        return take
    if num_units > MAX_UNITS:
        log_ways = SEARCH_WAYS.bit_length() - 1
        chunk = max(16, min(MAX_UNITS, 4096 >> log_ways))  # a [chunk, ways] pass of 4,096 entries
        _select_chunked_kernel[(batch,)](
            scores, sizes, take, num_units, budget, scores.stride(0), sizes.stride(0), CHUNK=chunk,
            LOG_WAYS=log_ways, num_warps=8 if chunk > 1024 else 4,
        )  # fmt: skip
        return take
    # Two compiled variants, not one per power of two: the daemon's warm-up compiles both, so a
    # session's unit count never compiles a kernel while it waits.
    block_u = SMALL_UNITS if num_units <= SMALL_UNITS else MAX_UNITS
    _select_kernel[(batch,)](
        scores, sizes, take,
        num_units, budget,
        scores.stride(0), sizes.stride(0),
        BLOCK_U=block_u, num_warps=4 if block_u <= 1024 else 8,
    )  # fmt: skip
    return take
