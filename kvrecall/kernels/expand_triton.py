"""Units -> token positions on the GPU (LouisKV, arXiv 2510.11292: the chosen units fill the budget).

expand_selection_triton: take [B, U] int (tokens each unit contributes, from
select_under_budget), per candidate token unit [B, M] int64, rank [B, M] int (index inside its
unit) and position [B, M] int64 -> [B, width] int64: the positions of the candidates with
rank < take[unit], in candidate order, the first `width` of them, -1 padded.

One program per row walks the candidates in blocks, keeping a running count: a prefix sum
gives each chosen candidate its output column, so there is no sort and nothing but the row's
candidates is read once. Matches `reference.expand_selection`.

expand_grouped_triton: the same answer when the candidates are grouped by unit, in unit order
(sizes[u] each, in rank order: what louiskv's table holds), from take, sizes [B, U] and
position [B, M] alone. One program per row: two prefix sums over its units (output columns
taken so far, candidate columns so far) into a scratch, then each output column finds its
unit by binary search and reads one position. It reads the row's units and `width`
positions, not all M candidates: at 32K tokens a row's 2K units against its 32K candidates'
unit, rank and position. Matches `reference.expand_grouped`. Imported only when Triton is.
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels._triton import next_power_of_2

_BLOCK = 4096  # candidates per iteration: 32K candidates in 8 dependent rounds, not 32 (issue #17)


@triton.jit(do_not_specialize=["M", "width", "stride_t", "stride_u", "stride_r", "stride_p"])
def _expand_kernel(
    take_ptr, unit_ptr, rank_ptr, pos_ptr, out_ptr,
    M, width, stride_t, stride_u, stride_r, stride_p,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    out_row = out_ptr + b * width
    count = tl.full((), 0, tl.int32)
    for m0 in range(0, M, BLOCK):
        m = m0 + tl.arange(0, BLOCK)
        ok = m < M
        unit = tl.load(unit_ptr + b * stride_u + m, mask=ok, other=0)
        rank = tl.load(rank_ptr + b * stride_r + m, mask=ok, other=0)
        taken = tl.load(take_ptr + b * stride_t + unit, mask=ok, other=0)
        chosen = ok & (rank < taken)
        column = count + tl.cumsum(chosen.to(tl.int32), 0) - 1
        keep = chosen & (column < width)
        position = tl.load(pos_ptr + b * stride_p + m, mask=keep, other=-1)
        tl.store(out_row + column, position, mask=keep)
        count += tl.sum(chosen.to(tl.int32), 0)
    for w0 in range(0, width, BLOCK):
        w = w0 + tl.arange(0, BLOCK)
        tl.store(out_row + w, tl.full((BLOCK,), -1, tl.int64), mask=(w < width) & (w >= count))


def expand_selection_triton(
    take: torch.Tensor, unit: torch.Tensor, rank: torch.Tensor, position: torch.Tensor, width: int
) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.expand_selection`)."""
    rows, candidates = unit.shape
    out = torch.empty(rows, width, dtype=torch.int64, device=unit.device)
    if out.numel() == 0:
        return out
    _expand_kernel[(rows,)](
        take, unit, rank, position, out,
        candidates, width, take.stride(0), unit.stride(0), rank.stride(0), position.stride(0),
        BLOCK=_BLOCK, num_warps=8,
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["U", "M", "width", "steps", "stride_t", "stride_s", "stride_p"])
def _expand_grouped_kernel(
    take_ptr, sizes_ptr, pos_ptr, scratch_ptr, out_ptr,
    U, M, width, steps, stride_t, stride_s, stride_p,
    BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    ends = scratch_ptr + b * 2 * U  # per unit: output columns taken up to and including it
    shift = ends + U  # per unit: its first candidate's column minus its first output column
    taken = tl.full((), 0, tl.int32)
    filled = tl.full((), 0, tl.int32)
    for u0 in range(0, U, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        ok = u < U
        size = tl.maximum(tl.load(sizes_ptr + b * stride_s + u, mask=ok, other=0).to(tl.int32), 0)
        take = tl.minimum(tl.maximum(tl.load(take_ptr + b * stride_t + u, mask=ok, other=0).to(tl.int32), 0), size)
        end = taken + tl.cumsum(take, 0)
        tl.store(ends + u, end, mask=ok)
        tl.store(shift + u, filled + tl.cumsum(size, 0) - size - (end - take), mask=ok)
        taken += tl.sum(take, 0)
        filled += tl.sum(size, 0)
    tl.debug_barrier()
    out_row = out_ptr + b * width
    for w0 in range(0, width, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        chosen = w < taken  # taken <= the row's candidates: a column past them stays -1
        lo = tl.zeros((BLOCK_W,), tl.int32)  # the first unit whose end passes w
        hi = lo + U
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) // 2
            below = tl.load(ends + tl.minimum(mid, U - 1), mask=chosen, other=0, cache_modifier=".cg") <= w
            lo = tl.where(active & below, mid + 1, lo)
            hi = tl.where(active & ~below, mid, hi)
        column = w + tl.load(shift + tl.minimum(lo, U - 1), mask=chosen, other=0, cache_modifier=".cg")
        keep = chosen & (column < M)
        position = tl.load(pos_ptr + b * stride_p + column, mask=keep, other=-1).to(tl.int64)
        tl.store(out_row + w, position, mask=w < width)


_BLOCK_U = 1024  # units per step of the prefix sums
_BLOCK_W = 1024  # output columns per step of the search


def expand_grouped_triton(take: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, width: int) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.expand_grouped`)."""
    rows, units = sizes.shape
    out = torch.full((rows, width), -1, dtype=torch.int64, device=sizes.device) if units == 0 else None
    if out is not None or rows == 0 or width == 0:
        return out if out is not None else torch.empty(rows, width, dtype=torch.int64, device=sizes.device)
    out = torch.empty(rows, width, dtype=torch.int64, device=sizes.device)
    scratch = torch.empty(rows, 2 * units, dtype=torch.int32, device=sizes.device)
    _expand_grouped_kernel[(rows,)](
        take, sizes, position, scratch, out,
        units, position.shape[1], width, units.bit_length(), take.stride(0), sizes.stride(0), position.stride(0),
        BLOCK_U=_BLOCK_U, BLOCK_W=min(_BLOCK_W, next_power_of_2(width)), num_warps=4,
    )  # fmt: skip
    return out
