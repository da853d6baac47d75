"""Greedy selection under a token budget on the GPU (LouisKV, arXiv 2510.11292; Quest pages too).

select_under_budget_triton: scores [B, U] float, sizes [B, U] int, budget -> take [B, U] int64:
units visited by descending score (ties: lower index first) each take min(size, budget left);
units scoring -inf (or NaN) take nothing. Matches `reference.select_under_budget`.

One program sorts one row in registers: each score becomes an order-preserving int32, packed
above its (reversed) index into one int64 key, so a single descending `tl.sort` gives the
visit order with ties broken by index. Rows longer than MAX_UNITS fall back to the reference.
Imported only when Triton is (see `_triton`).
"""

import torch
import triton
import triton.language as tl

from kvrecall.kernels import reference

MAX_UNITS = 4096
SMALL_UNITS = 256


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
    score_row = scores_ptr + b * stride_sb
    scores = tl.load(score_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
    bits = scores.to(tl.int32, bitcast=True)
    ordered_bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order == signed int order
    keys = (ordered_bits.to(tl.int64) << 32) | (BLOCK_U - 1 - offs).to(tl.int64)
    keys = tl.where(in_row, keys, -(2**63))  # padding sorts after every unit
    keys = tl.sort(keys, descending=True)
    unit = (BLOCK_U - 1) - (keys & (BLOCK_U - 1))  # rank -> unit index (the low bits hold it)
    ranked = in_row  # the first U ranks are the units
    unit_score = tl.load(score_row + unit, mask=ranked, other=float("-inf")).to(tl.float32)
    size = tl.load(sizes_ptr + b * stride_zb + unit, mask=ranked, other=0).to(tl.int64)
    size = tl.where(unit_score > float("-inf"), tl.maximum(size, 0), 0)
    before = tl.cumsum(size, axis=0) - size
    take = tl.minimum(size, tl.maximum(budget - before, 0))
    tl.store(take_ptr + b * U + unit, take, mask=ranked)


def select_under_budget_triton(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.select_under_budget`)."""
    batch, num_units = scores.shape
    if num_units > MAX_UNITS:
        return reference.select_under_budget(scores, sizes, budget)
    take = torch.empty(batch, num_units, dtype=torch.int64, device=scores.device)
    if take.numel() == 0:
        return take
    # Two compiled variants, not one per power of two: the daemon's warm-up compiles both, so a
    # session's unit count never compiles a kernel while it waits (the sort is cheap either way).
    block_u = SMALL_UNITS if num_units <= SMALL_UNITS else MAX_UNITS
    _select_kernel[(batch,)](
        scores, sizes, take,
        num_units, budget,
        scores.stride(0), sizes.stride(0),
        BLOCK_U=block_u, num_warps=4 if block_u <= 1024 else 8,
    )  # fmt: skip
    return take
