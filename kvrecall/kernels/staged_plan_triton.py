"""The staged placement's plan in one launch (see staged_plan.py): one program per row.
Imported only when Triton is (see `_triton`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _plan_kernel(
    scratch, counts, ends, tables, key_rows, targets, ends_out, targets_out, table_stride, rows_per_session,
    first_slot, H, P, D, C, BLOCK_R: tl.constexpr, ENDS_OUT: tl.constexpr, TARGETS_OUT: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    new = tl.load(counts + r * 2 + 1).to(tl.int64)
    end = tl.load(ends + r)
    start = end - new
    if ENDS_OUT:  # (the row's end where the host reads it: a mapped, pinned buffer)
        tl.store(ends_out + r, end)
    k = tl.arange(0, BLOCK_R)
    take = k < new
    position = tl.load(scratch + r * 2 * BLOCK_R + k, mask=take, other=0)
    slot = tl.load(scratch + r * 2 * BLOCK_R + BLOCK_R + k, mask=take, other=0)
    session = r // rows_per_session
    local = r - session * rows_per_session
    layer = local // H
    head = local - layer * H
    page = position // P
    base = tl.load(tables + session * table_stride + page, mask=take, other=0)
    key_row = (base + ((layer * 2 * H + head) * P + position - page * P) * D) // D
    target = local * C + first_slot + slot
    tl.store(key_rows + start + k, key_row, mask=take)
    tl.store(targets + start + k, target, mask=take)
    if TARGETS_OUT:  # (the targets also where the host reads them: a mapped, pinned buffer)
        tl.store(targets_out + start + k, target, mask=take)


def staged_plan_triton(
    scratch: torch.Tensor, counts: torch.Tensor, block_r: int, tables: torch.Tensor, rows_per_session: int,
    first_slot: int, num_kv_heads: int, tokens_per_page: int, row_len: int, capacity: int,
    rows_out: torch.Tensor | None = None, ends_out: torch.Tensor | None = None, targets_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    R = scratch.shape[0]
    ends = counts[:, 1].to(torch.int64).cumsum(0)
    key_rows = rows_out if rows_out is not None else torch.empty(R * block_r, dtype=torch.int64, device=scratch.device)
    targets = torch.empty(R * block_r, dtype=torch.int64, device=scratch.device)
    tables = tables.contiguous()
    _plan_kernel[(R,)](
        scratch, counts, ends, tables, key_rows, targets, ends_out if ends_out is not None else ends,
        targets_out if targets_out is not None else targets, tables.stride(0), rows_per_session, first_slot,
        num_kv_heads, tokens_per_page, row_len, capacity, BLOCK_R=block_r, ENDS_OUT=ends_out is not None,
        TARGETS_OUT=targets_out is not None, num_warps=4 if block_r <= 1024 else 8,
    )  # fmt: skip
    return key_rows, targets, ends
