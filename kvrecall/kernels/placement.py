"""Retrieved-region placement, ring spill and token stores: the daemon's working-set and
host-tier writes (WorkingSet, SequenceStore).

Kernel: `placement_triton.py`; reference: `reference.py`; dispatch: `kvrecall.kernels`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import torch

from kvrecall.kernels import placement_staged, reference
from kvrecall.kernels._checks import (
    INDEX_DTYPES,
    check_int,
    check_same_device,
    check_size,
    check_tensor,
)
from kvrecall.kernels._triton import use_triton

# How a *background* placement on a GPU reads the pinned pool (one whose answer the worker does
# not wait for: `background_reads`): "copy" (the host gathers the rows, the copy engine moves
# them: placement_staged.py; the GPU's SMs stay free for the workers, the answer comes later),
# "kernel" (the placement kernel's own loads over PCIe), or "auto": copy for a placement that
# can move at most AUTO_COPY_MAX_BYTES, the kernel above. Every other placement (an ingest, a
# chunk, a boundary the worker waits for) takes the kernel's loads, the faster answer. The
# daemon sets it from its `host_reads` setting (set_host_reads).
HOST_READS = "auto"
# On one H200 (bench e2e, Llama-3-8B shape, budget 1024, 11.7% boundaries, lag 4; runs on fresh
# machines differ by up to 25% at 128K x 8, so these are one sample each):
# * 64 sequences at 4K (about 7.5 sessions a call; up to about 1 GiB, 0.5 GiB moved): the
#   kernel's reads answered in 41/52 ms (p50/p90), no step waited, 1,734-1,760 tokens/s; copy
#   reads answered in 70/105 ms (the host's gather of 0.5 GiB), 22 of 96 steps waited, 1,415.
# * 44 sequences at 32K under a 16 GiB GPU KV cap (about 5 sessions a call, up to 640 MiB):
#   copy reads 1,656 tokens/s (4.44x full), the kernel's 1,321 (3.54x).
# * 32K x 8 (1-2 sessions a call, up to 256 MiB): copy reads 1.14-1.31x full over three runs;
#   the kernel's reads gave 1.04x in an earlier run at lag 3 (-kernelreads-e2e.json).
# (bench/results/2026-11-30-h200x2-notices-*.json)
AUTO_COPY_MAX_BYTES = 768 << 20
HOST_READS_MODES = ("auto", "copy", "kernel")
_scope = threading.local()


def set_host_reads(mode: str) -> None:
    """Choose how background placements read the pinned pool (see HOST_READS), process-wide."""
    global HOST_READS
    if mode not in HOST_READS_MODES:
        raise ValueError(f"host_reads: {mode!r}, expected one of {', '.join(HOST_READS_MODES)}")
    HOST_READS = mode


@contextlib.contextmanager
def background_reads(force_copy: bool = False):
    """Placements of this thread inside the block are background ones (see HOST_READS);
    `force_copy`: they read by the copy engine whatever HOST_READS says (worker copies of a
    session that stages every row: placement_staged.py)."""
    before = getattr(_scope, "background", False), getattr(_scope, "force_copy", False)
    _scope.background, _scope.force_copy = True, force_copy
    try:
        yield
    finally:
        _scope.background, _scope.force_copy = before


def copy_reads(most_bytes: int = 0) -> bool:
    """Whether this thread's placement that can move at most `most_bytes` from the pool reads
    it by the copy engine now."""
    if not getattr(_scope, "background", False):
        return False
    if getattr(_scope, "force_copy", False):
        return True
    return HOST_READS == "copy" or (HOST_READS == "auto" and most_bytes <= AUTO_COPY_MAX_BYTES)


def always_staged(keys: torch.Tensor, host: torch.Tensor, retrieved: int) -> bool:
    """Whether every placement into a working set like `keys` ([..., D], on its device) from the
    pool `host` with `retrieved` slots a row takes the staged path (placement_staged.copy_staged)
    when its thread forces copy reads: the Triton kernel runs there (not the reference, which
    writes rows in place) and its rows can go by the copy engine."""
    if retrieved <= 0 or not use_triton("auto", keys.device):
        return False
    from kvrecall.kernels.placement_triton import MAX_RETRIEVED, staging_possible

    return retrieved <= MAX_RETRIEVED and staging_possible(keys, host)


def _check_host_pages(
    keys: torch.Tensor, values: torch.Tensor, host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int,
    num_kv_heads: int,
) -> None:
    check_tensor("keys", keys, rank=3)
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(f"values: {tuple(values.shape)} {values.dtype}, expected keys' {tuple(keys.shape)} {keys.dtype}")
    for name, tensor in (("keys", keys), ("values", values)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    _check_pages("keys", keys, host, page_base, tokens_per_page)
    if page_base.device != keys.device:
        raise ValueError(f"page_base: on {page_base.device}, expected {keys.device} (like keys)")
    check_int("num_kv_heads", num_kv_heads, 1)
    if keys.shape[0] % num_kv_heads:
        raise ValueError(f"keys: {keys.shape[0]} rows is not a multiple of num_kv_heads={num_kv_heads}")


def _check_pages(name: str, source: torch.Tensor, host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int) -> None:
    """The host pool and page table a write of `source` (named `name`) goes through."""
    check_tensor("host", host, rank=1)
    if host.dtype != source.dtype:
        raise ValueError(f"host: dtype {host.dtype} differs from {name}'s dtype {source.dtype}")
    check_tensor("page_base", page_base, rank=1, dtypes=(torch.int64,))
    check_int("tokens_per_page", tokens_per_page, 1)
    if source.device.type == host.device.type == "cuda" and source.device != host.device:
        raise ValueError(f"host: on {host.device}, {name} on {source.device}: one GPU only")


def place_retrieved(
    slot_pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selection: torch.Tensor,
    first_slot: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    resident_max: torch.Tensor | None = None,
    impl: str = "auto",
    on_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Make slots [first_slot, first_slot + R) of each row hold `selection`, in place -> [B, 2] int32.

    slot_pos [B, C] int32, keys / values [B, C, D] contiguous (row b = layer b // H, head
    b % H), selection [B, R] int (-1 = none; distinct per row). Tokens already resident keep
    their slots, the k-th new one goes to the k-th freed slot and its K/V rows are copied from
    `host` (the flat pool: pinned memory read by the GPU directly), pages [L, 2, H, P, D] at
    offsets page_base [pages] int64 (on keys' device). Positions past the pages count as none.
    Returns per row (selected, gathered) on slot_pos' device, with no host sync.
    resident_max (int64 scalar on that device), if given, is raised to the most filled slots
    (all C) of any row afterwards. Kernel: R <= placement_triton.MAX_RETRIEVED, else the reference
    (inside a placement_staged.worker_copies block that names these keys, the reference that
    stages the new rows instead of writing them: place_staged_reference). on_counts, if given, is called with the counts once they are queued and before any host sync
    of the placement (a staged one syncs for its plan), so the launches it makes (totals of the
    counts, say) go with the placement's and not after its copies.
    """
    device = _check_place(slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page,
                          num_kv_heads, resident_max)  # fmt: skip
    if use_triton(impl, device):
        from kvrecall.kernels.placement_triton import place_retrieved_triton

        return place_retrieved_triton(
            slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
            resident_max, on_counts,
        )  # fmt: skip
    if (staging := placement_staged.staging_for(keys)) is not None:  # worker copies: rows staged, none in place
        return reported(placement_staged.place_staged_reference(
            slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
            resident_max, staging,
        ), on_counts)  # fmt: skip
    return reported(reference.place_retrieved(
        slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads, resident_max
    ), on_counts)  # fmt: skip


def reported(counts: torch.Tensor, on_counts: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """counts, handed to on_counts first (place_retrieved's hook)."""
    if on_counts is not None:
        on_counts(counts)
    return counts


def place_retrieved_many(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    selection: torch.Tensor,
    first_slot: int,
    host: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    impl: str = "auto",
    on_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """place_retrieved for S sessions of one shape at once -> [S * B, 2] int32 (session s's
    rows at [s * B, (s + 1) * B)).

    parts: per session (slot_pos [B, C], keys / values [B, C, D], page_base [pages] (its host
    pages in the shared pool `host`), resident_max int64 scalar), every session's tensors of
    the same shapes and dtypes; selection [S * B, R], session s's rows first-to-last. The
    kernel is one launch over the S * B rows (pointer offsets per session); the reference, and
    the kernel where it cannot run (see place_retrieved, or tensors not at whole-element
    distances), place session by session (place_retrieved). on_counts: as place_retrieved's, with
    all of them."""
    if not parts:
        raise ValueError("parts: at least one session is required")
    first = parts[0]
    check_tensor("selection", selection, rank=2, dtypes=INDEX_DTYPES)
    check_size("selection", selection, 0, len(parts) * first[0].shape[0], "S * B of the parts")
    for i, (slot_pos, keys, values, page_base, resident_max) in enumerate(parts):
        check_like_first(i, parts[i], first)
        if resident_max is None:
            raise ValueError(f"parts[{i}]: resident_max is required")
        rows = slice(i * slot_pos.shape[0], (i + 1) * slot_pos.shape[0])
        device = _check_place(slot_pos, keys, values, selection[rows], first_slot, host, page_base, tokens_per_page,
                              num_kv_heads, resident_max)  # fmt: skip
    if use_triton(impl, device):
        from kvrecall.kernels.placement_triton import place_retrieved_many_triton

        counts = place_retrieved_many_triton(parts, selection, first_slot, host, tokens_per_page, num_kv_heads,
                                             on_counts)  # fmt: skip
        if counts is not None:
            return counts
    rows = first[0].shape[0]
    return reported(torch.cat([
        place_retrieved(slot_pos, keys, values, selection[i * rows : (i + 1) * rows], first_slot, host, page_base,
                        tokens_per_page, num_kv_heads, resident_max, impl)
        for i, (slot_pos, keys, values, page_base, resident_max) in enumerate(parts)
    ]), on_counts)  # fmt: skip


def check_like_first(i: int, part: tuple[torch.Tensor, ...], first: tuple[torch.Tensor, ...]) -> None:
    """parts[i]'s slot_pos, keys and values (its first three tensors) have parts[0]'s shapes,
    dtypes and device (a launch over many sessions): else ValueError naming them."""
    for name, tensor, like in zip(("slot_pos", "keys", "values"), part[:3], first[:3], strict=True):
        if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
            raise ValueError(f"parts[{i}].{name}: {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, "
                             f"unlike parts[0]'s {tuple(like.shape)} {like.dtype} on {like.device}")


def _check_place(
    slot_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: torch.Tensor, first_slot: int,
    host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int, num_kv_heads: int,
    resident_max: torch.Tensor | None,
) -> torch.device:  # fmt: skip
    """place_retrieved's argument checks (ValueError naming the argument) -> the device."""
    check_tensor("slot_pos", slot_pos, rank=2, dtypes=(torch.int32,))
    _check_host_pages(keys, values, host, page_base, tokens_per_page, num_kv_heads)
    check_tensor("selection", selection, rank=2, dtypes=INDEX_DTYPES)
    check_size("keys", keys, 0, slot_pos.shape[0], "B of slot_pos")
    check_size("keys", keys, 1, slot_pos.shape[1], "C of slot_pos")
    check_size("selection", selection, 0, slot_pos.shape[0], "B of slot_pos")
    check_int("first_slot", first_slot, 0)
    if first_slot + selection.shape[1] > slot_pos.shape[1]:
        raise ValueError(
            f"selection: {selection.shape[1]} slots from first_slot={first_slot} pass capacity {slot_pos.shape[1]}"
        )
    if not slot_pos.is_contiguous():
        raise ValueError("slot_pos: must be contiguous")
    device = check_same_device(slot_pos=slot_pos, keys=keys, values=values, selection=selection)
    if resident_max is not None:
        check_tensor("resident_max", resident_max, rank=0, dtypes=(torch.int64,))
        check_same_device(slot_pos=slot_pos, resident_max=resident_max)
    return device


def spill_ring(
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    end: int,
    ring_start: int,
    ring_size: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    impl: str = "auto",
) -> None:
    """Copy tokens [start, end) of every row from the ring (slot ring_start + position %
    ring_size of keys / values [B, C, D]) into the host pages (layout of `place_retrieved`).
    The GPU writes pinned host memory directly: no D2H sync. end - start <= ring_size."""
    _check_host_pages(keys, values, host, page_base, tokens_per_page, num_kv_heads)
    check_int("start", start, 0)
    check_int("end", end, start)
    check_int("ring_size", ring_size, max(1, end - start))
    check_int("ring_start", ring_start, 0)
    if ring_start + ring_size > keys.shape[1]:
        raise ValueError(f"ring_size: slots [{ring_start}, {ring_start + ring_size}) pass capacity {keys.shape[1]}")
    if end > page_base.numel() * tokens_per_page:
        raise ValueError(f"end: {end} is past the {page_base.numel() * tokens_per_page} positions of the pages")
    device = keys.device if keys.device.type == "cuda" else host.device
    if use_triton(impl, device):
        from kvrecall.kernels.placement_triton import spill_ring_triton

        spill_ring_triton(keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page, num_kv_heads)
        return
    reference.spill_ring(keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page, num_kv_heads)


def store_tokens(
    kv: torch.Tensor,
    start: int,
    first_layer: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    impl: str = "auto",
) -> None:
    """Copy kv [l, 2, H, n, D] (layers [first_layer, first_layer + l), K then V) into the host
    pages (layout of `place_retrieved`) as tokens [start, start + n): a streamed ingest's
    layer, a chunk. On a GPU one launch writes the pinned pool directly (UVA), where a copy
    per page would cost a D2H transfer and a sync each (thousands per long layer)."""
    check_tensor("kv", kv, rank=5)
    if kv.shape[1] != 2:
        raise ValueError(f"kv: shape {tuple(kv.shape)}, expected [layers, 2, heads, tokens, dim]")
    _check_pages("kv", kv, host, page_base, tokens_per_page)
    check_int("start", start, 0)
    check_int("first_layer", first_layer, 0)
    end = start + kv.shape[3]
    if end > page_base.numel() * tokens_per_page:
        raise ValueError(f"kv: tokens up to {end} pass the {page_base.numel() * tokens_per_page} positions of the pages")
    if kv.is_cuda and page_base.device != kv.device:
        raise ValueError(f"page_base: on {page_base.device}, expected {kv.device} (like kv)")
    device = kv.device if kv.device.type == "cuda" else host.device
    if use_triton(impl, device):
        from kvrecall.kernels.placement_triton import store_tokens_triton

        store_tokens_triton(kv, start, first_layer, host, page_base, tokens_per_page)
        return
    reference.store_tokens(kv, start, first_layer, host, page_base, tokens_per_page)
