"""The AppendNotices of many sessions in one launch: spill each session's newest ring tokens to
its host pages, empty the ring slots of the tokens that left its window, note its most
resident row, and (optionally) sum the keys that left, per row (LouisKV's open segment).

A Boundaries call answers the notices of every slot that fell due in a step; per session the
spill, the ring clear and the resident count were 7-8 launches and about 1.3 ms of host time
on an H200 (kvrecall.bench.notices), so 64 sessions took 112 ms. Here they are one launch.

Kernel: `notice_triton.py`; reference: `notice_reference` below (session by session, the ops
the single-session path runs); dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels import reference
from kvrecall.kernels._checks import check_int, check_tensor
from kvrecall.kernels._triton import use_triton
from kvrecall.kernels.placement import _check_host_pages, check_like_first

# Per session: slot_pos [B, C] int32, keys / values [B, C, D], page_base [pages] int64 (its
# pages in the shared pool), resident_max int64 scalar.
NoticePart = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def spill_evict_many(
    parts: list[NoticePart], spills: list[tuple[int, int]], evictions: list[tuple[int, int]], ring_start: int,
    ring_size: int, host: torch.Tensor, tokens_per_page: int, num_kv_heads: int, sums: torch.Tensor | None = None,
    impl: str = "auto", clear: bool = True,
) -> None:  # fmt: skip
    """For each session s (every part of the same shapes and dtypes, on one device):

    1. spill tokens spills[s] = [start, end) of every row from the ring (slot ring_start +
       position % ring_size) into its host pages (kernels.spill_ring);
    2. the ring slots holding a position in evictions[s] = [low, high) become -1 (slot_pos);
    3. sums (float32 [S, B, D], optional): row b's keys of the slots emptied in 2, summed (0
       where none);
    4. resident_max is raised to the most filled slots (slot_pos >= 0) of any row, after 2.

    `clear=False` (deferred eviction) leaves the slot_pos of 2 in place (the worker masks
    those slots itself); 3 and 4 count them as emptied all the same.

    end - start <= ring_size. The kernel is one launch for all sessions (each addressed at its
    offset from the first's); the reference goes session by session."""
    if not parts:
        raise ValueError("parts: at least one session is required")
    if len(spills) != len(parts) or len(evictions) != len(parts):
        raise ValueError(f"spills / evictions: {len(spills)} / {len(evictions)} entries for {len(parts)} sessions")
    first = parts[0]
    for i, (slot_pos, keys, values, page_base, resident_max) in enumerate(parts):
        check_tensor(f"parts[{i}].slot_pos", slot_pos, rank=2, dtypes=(torch.int32,))
        check_like_first(i, parts[i], first)
        _check_host_pages(keys, values, host, page_base, tokens_per_page, num_kv_heads)
        if keys.shape[:2] != slot_pos.shape:
            raise ValueError(f"parts[{i}].keys: {tuple(keys.shape)} does not match slot_pos {tuple(slot_pos.shape)}")
        check_tensor(f"parts[{i}].resident_max", resident_max, rank=0, dtypes=(torch.int64,))
        start, end = spills[i]
        check_int(f"spills[{i}] start", start, 0)
        check_int(f"spills[{i}] end", end, start)
        if end - start > ring_size:
            raise ValueError(f"spills[{i}]: {end - start} tokens do not fit the ring of {ring_size}")
        if end > page_base.numel() * tokens_per_page:
            raise ValueError(f"spills[{i}]: {end} is past the {page_base.numel() * tokens_per_page} positions of the pages")
        check_int(f"evictions[{i}] low", evictions[i][0], 0)
    rows, capacity, dim = first[1].shape
    check_int("ring_start", ring_start, 0)
    check_int("ring_size", ring_size, 1)
    if ring_start + ring_size > capacity:
        raise ValueError(f"ring_size: slots [{ring_start}, {ring_start + ring_size}) pass capacity {capacity}")
    if sums is not None:
        check_tensor("sums", sums, rank=3, dtypes=(torch.float32,))
        if tuple(sums.shape) != (len(parts), rows, dim) or sums.device != first[1].device or not sums.is_contiguous():
            raise ValueError(f"sums: {tuple(sums.shape)} on {sums.device}, expected contiguous "
                             f"{(len(parts), rows, dim)} on {first[1].device}")  # fmt: skip
    device = first[1].device if first[1].device.type == "cuda" else host.device
    if use_triton(impl, device):
        from kvrecall.kernels.notice_triton import spill_evict_many_triton

        if spill_evict_many_triton(parts, spills, evictions, ring_start, ring_size, host, tokens_per_page,
                                   num_kv_heads, sums, clear):  # fmt: skip
            return
    notice_reference(parts, spills, evictions, ring_start, ring_size, host, tokens_per_page, num_kv_heads, sums,
                     clear)  # fmt: skip


def notice_reference(
    parts: list[NoticePart], spills: list[tuple[int, int]], evictions: list[tuple[int, int]], ring_start: int,
    ring_size: int, host: torch.Tensor, tokens_per_page: int, num_kv_heads: int, sums: torch.Tensor | None,
    clear: bool = True,
) -> None:  # fmt: skip
    """spill_evict_many, session by session, in PyTorch."""
    for s, (slot_pos, keys, values, page_base, resident_max) in enumerate(parts):
        start, end = spills[s]
        reference.spill_ring(keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page,
                             num_kv_heads)  # fmt: skip
        low, high = evictions[s]
        ring = slot_pos[:, ring_start : ring_start + ring_size]
        cleared = (ring >= low) & (ring < high)
        if sums is not None:
            ring_keys = keys[:, ring_start : ring_start + ring_size].float()
            sums[s] = torch.where(cleared[..., None], ring_keys, 0.0).sum(dim=1)
        # Counted as emptied either way; slots evicted earlier and left in place (clear=False)
        # hold positions below low.
        gone = (ring >= 0) & (ring < high)
        resident = (slot_pos >= 0).sum(dim=1) - gone.sum(dim=1)
        if clear:
            ring.masked_fill_(cleared, -1)
        torch.maximum(resident_max, resident.amax(), out=resident_max)
