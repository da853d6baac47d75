"""The plan of a staged placement (placement_staged.copy_staged): which pool rows to gather and
which working-set rows they go to, compacted in row order.

Kernel: `staged_plan_triton.py` (one launch); reference: `staged_plan_reference` here (the ~20
torch ops it replaces, each a launch the daemon pays for beside a decoding worker: issue #17).
"""

from __future__ import annotations

import torch

from kvrecall.kernels._triton import use_triton


def staged_plan(
    scratch: torch.Tensor, counts: torch.Tensor, block_r: int, tables: torch.Tensor, rows_per_session: int,
    first_slot: int, num_kv_heads: int, tokens_per_page: int, row_len: int, capacity: int, impl: str = "auto",
    rows_out: torch.Tensor | None = None, ends_out: torch.Tensor | None = None, targets_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> (key_rows, targets, ends), all int64.

    scratch [R, 2 * block_r] int64 (per row: the k-th new token's position, then the k-th
    free slot), counts [R, 2] int32 (selected, new); tables [S,
    pages] int64: session s's page table (element offsets of its pages in the pool), padded;
    row r is session r // rows_per_session, layer (r % rows_per_session) // H, head ... % H.
    ends [R]: cumulative new tokens; entry (r, k < new[r]) is at ends[r] - new[r] + k of
    key_rows (the pool row of its K, `row_len` elements a row: its V row is H * P rows on) and
    of targets (its row in the session's [rows_per_session * capacity, row_len] working set).
    Entries from ends[-1] on are unspecified.

    rows_out [>= R * block_r] int64, ends_out [R] int64 (any memory the device can write: a
    mapped, pinned host buffer): key_rows is written there (and returned), and ends also
    there, by the kernel itself, so the host reads the plan after a sync with no copy of it
    queued behind the kernel (placement_staged's `plan_readback` "mapped"). targets_out [>= R *
    block_r] int64 (likewise): the targets written there too (the device's are returned), for
    a DMA of the host's into worker staging areas (no device-to-device copy in the daemon's context)."""
    if use_triton(impl, scratch.device):
        from kvrecall.kernels.staged_plan_triton import staged_plan_triton

        return staged_plan_triton(scratch, counts, block_r, tables, rows_per_session, first_slot, num_kv_heads,
                                  tokens_per_page, row_len, capacity, rows_out, ends_out, targets_out)  # fmt: skip
    key_rows, targets, ends = staged_plan_reference(scratch, counts, block_r, tables, rows_per_session, first_slot,
                                                    num_kv_heads, tokens_per_page, row_len, capacity)  # fmt: skip
    if rows_out is not None:
        rows_out[: key_rows.numel()].copy_(key_rows)
        key_rows = rows_out
    if ends_out is not None:
        ends_out.copy_(ends)
    if targets_out is not None:
        targets_out[: targets.numel()].copy_(targets)
    return key_rows, targets, ends


def staged_plan_reference(
    scratch: torch.Tensor, counts: torch.Tensor, block_r: int, tables: torch.Tensor, rows_per_session: int,
    first_slot: int, num_kv_heads: int, tokens_per_page: int, row_len: int, capacity: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    device = scratch.device
    H, P, D, C = num_kv_heads, tokens_per_page, row_len, capacity
    R = scratch.shape[0]
    new = counts[:, 1].to(torch.int64)
    rank = torch.arange(block_r, device=device)[None, :]
    take = rank < new[:, None]
    row = torch.arange(R, device=device)[:, None]
    position = torch.where(take, scratch[:, :block_r], 0)
    slot = scratch[:, block_r : 2 * block_r]
    session = row // rows_per_session
    local = row - session * rows_per_session
    layer, head = local // H, local % H
    page = position // P
    base = tables[session.expand(-1, block_r), page]
    key_row = (base + (((layer * 2) * H + head) * P + position - page * P) * D) // D  # K rows of the pool
    target = local * C + first_slot + slot
    # Compacted in row order: entry (r, k) goes to ends[r] - new[r] + k; the others to a spare
    # last element.
    ends = new.cumsum(0)
    whole = R * block_r
    dest = torch.where(take, ends[:, None] - new[:, None] + rank, whole).view(-1)
    key_rows = torch.empty(whole + 1, dtype=torch.int64, device=device)
    key_rows.scatter_(0, dest, key_row.reshape(-1))
    targets = torch.empty(whole + 1, dtype=torch.int64, device=device)
    targets.scatter_(0, dest, target.reshape(-1))
    return key_rows[:whole], targets[:whole], ends
