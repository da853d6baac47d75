"""Units -> token positions on the GPU (LouisKV, arXiv 2510.11292: the chosen units fill the budget).

expand_selection_triton: take [B, U] int (tokens each unit contributes, from
select_under_budget), per candidate token unit [B, M] int64, rank [B, M] int (index inside its
unit) and position [B, M] int64 -> [B, width] int64: the positions of the candidates with
rank < take[unit], in candidate order, the first `width` of them, -1 padded.

One program per row walks the candidates in blocks, keeping a running count: a prefix sum
gives each chosen candidate its output column, so there is no sort and nothing but the row's
candidates is read once. Matches `reference.expand_selection`. Imported only when Triton is.
"""

import torch
import triton
import triton.language as tl

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
