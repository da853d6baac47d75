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
unit, rank and position. Matches `reference.expand_grouped`. With pinned tokens (PINNED,
kernels.expand_pinned) the same program first sums the scored units' sizes: a row whose units
all fit takes them whole; another writes its pinned tokens first and drops them from its
expansion (binary search in the ascending pinned row), which took louiskv's choose_units about
twenty small launches before. Matches `reference.expand_pinned`. Imported only when Triton is.
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


@triton.jit(do_not_specialize=["U", "M", "P", "width", "steps", "pin_steps", "stride_t", "stride_s", "stride_p",
                               "split", "stride_q"])
def _expand_grouped_kernel(
    take_ptr, sizes_ptr, pos_ptr, scratch_ptr, out_ptr, scores_ptr, pinned_ptr, take_out_ptr, tail_ptr,
    U, M, P, width, steps, pin_steps, stride_t, stride_s, stride_p, split, stride_q,
    BLOCK_U: tl.constexpr, BLOCK_W: tl.constexpr, PINNED: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    # TAIL: candidate columns [split, M) are the tail's (its column 0 = column split), the rest pos's.
    b = tl.program_id(0).to(tl.int64)
    ends = scratch_ptr + b * 2 * U  # per unit: output columns taken up to and including it
    shift = ends + U  # per unit: its first candidate's column minus its first output column
    fits = False  # PINNED: every scored unit fits the whole width (take them all, no pinned first)
    if PINNED:
        whole = tl.full((), 0, tl.int32)
        for u0 in range(0, U, BLOCK_U):
            u = u0 + tl.arange(0, BLOCK_U)
            ok = u < U
            size = tl.maximum(tl.load(sizes_ptr + b * stride_s + u, mask=ok, other=0).to(tl.int32), 0)
            scored = tl.load(scores_ptr + b * U + u, mask=ok, other=float("-inf")) > float("-inf")
            whole += tl.sum(tl.where(scored, size, 0), 0)
        fits = whole <= width
        mixed = (whole > width).to(tl.int32)  # pinned tokens first
    taken = tl.full((), 0, tl.int32)
    filled = tl.full((), 0, tl.int32)
    for u0 in range(0, U, BLOCK_U):
        u = u0 + tl.arange(0, BLOCK_U)
        ok = u < U
        size = tl.maximum(tl.load(sizes_ptr + b * stride_s + u, mask=ok, other=0).to(tl.int32), 0)
        raw = tl.load(take_ptr + b * stride_t + u, mask=ok, other=0)
        if PINNED:
            scored = tl.load(scores_ptr + b * U + u, mask=ok, other=float("-inf")) > float("-inf")
            raw = tl.where(fits, tl.where(scored, size, 0).to(raw.dtype), raw)
            tl.store(take_out_ptr + b * U + u, raw, mask=ok)
        take = tl.minimum(tl.maximum(raw.to(tl.int32), 0), size)
        end = taken + tl.cumsum(take, 0)
        tl.store(ends + u, end, mask=ok)
        tl.store(shift + u, filled + tl.cumsum(size, 0) - size - (end - take), mask=ok)
        taken += tl.sum(take, 0)
        filled += tl.sum(size, 0)
    tl.debug_barrier()
    out_row = out_ptr + b * width
    first = 0  # the output column of the expansion's first position
    if PINNED:  # unless everything fits: the pinned tokens first, then the expansion less them
        first = tl.where(fits, 0, P)
        for w0 in range(0, P, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            tl.store(out_row + w, tl.load(pinned_ptr + b * P + w, mask=w < P), mask=(w < P) & (w * 0 + mixed > 0))
    for w0 in range(0, width - first, BLOCK_W):
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
        if TAIL:
            head = column < split
            position = tl.where(
                head,
                tl.load(pos_ptr + b * stride_p + column, mask=keep & head, other=-1).to(tl.int64),
                tl.load(tail_ptr + b * stride_q + (column - split), mask=keep & ~head, other=-1).to(tl.int64),
            )
        else:
            position = tl.load(pos_ptr + b * stride_p + column, mask=keep, other=-1).to(tl.int64)
        if PINNED:  # a pinned token the expansion holds too stays in the pinned part only
            lo = tl.zeros((BLOCK_W,), tl.int32)  # the first pinned entry >= position (padding: last)
            hi = lo + P
            for _ in range(pin_steps):
                active = lo < hi
                mid = (lo + hi) // 2
                entry = tl.load(pinned_ptr + b * P + tl.minimum(mid, P - 1), mask=keep, other=0)
                below = (entry >= 0) & (entry < position)
                lo = tl.where(active & below, mid + 1, lo)
                hi = tl.where(active & ~below, mid, hi)
            found = tl.load(pinned_ptr + b * P + tl.minimum(lo, P - 1), mask=keep & (lo < P), other=-1)
            position = tl.where(keep & (w * 0 + mixed > 0) & (found == position), -1, position)
        tl.store(out_row + first + w, position, mask=w < width - first)


_BLOCK_U = 1024  # units per step of the prefix sums
_BLOCK_W = 1024  # output columns per step of the search


def expand_grouped_triton(
    take: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, width: int,
    scores: torch.Tensor | None = None, pinned: torch.Tensor | None = None, tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Launch on checked arguments (see `kvrecall.kernels.expand_grouped` / `expand_pinned`):
    (positions, the take used: None without pinned). `tail`: candidate columns after position's."""
    rows, units = sizes.shape
    pinning = pinned is not None
    take_out = torch.empty(take.shape, dtype=take.dtype, device=take.device) if pinning else None
    out = torch.empty(rows, width, dtype=torch.int64, device=sizes.device)
    if rows == 0 or (width == 0 and not pinning):
        return out, take_out
    if units == 0 and not pinning:
        return out.fill_(-1), take_out
    P = pinned.shape[1] if pinning else 0
    if pinning:
        scores, pinned = scores.contiguous(), pinned.contiguous()
    scratch = torch.empty(rows, 2 * max(units, 1), dtype=torch.int32, device=sizes.device)
    split = position.shape[1]
    _expand_grouped_kernel[(rows,)](
        take, sizes, position, scratch, out, scores if pinning else take, pinned if pinning else take,
        take_out if pinning else take, position if tail is None else tail,
        units, split + (0 if tail is None else tail.shape[1]), P, width, units.bit_length(), P.bit_length(),
        take.stride(0), sizes.stride(0), position.stride(0), split, position.stride(0) if tail is None else tail.stride(0),
        BLOCK_U=_BLOCK_U, BLOCK_W=min(_BLOCK_W, next_power_of_2(max(width, P, 1))), PINNED=pinning,
        TAIL=tail is not None, num_warps=4,
    )  # fmt: skip
    return out, take_out
