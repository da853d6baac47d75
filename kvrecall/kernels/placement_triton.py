"""Retrieved-region placement and ring spill on the GPU: no host sync, no nonzero (LouisKV, Quest, WindowKV).

place_retrieved_triton: one program per (layer, KV head) row. It diffs the row's current
retrieved slots against the new selection, keeps resident tokens in their slots, gives the
k-th new token the k-th freed slot, writes slot_pos and copies the new tokens' K/V rows
straight from the host pages (UVA: the pinned pool is read over PCIe, no staging copy).
Membership (is a current slot's token selected? is a selected token resident?) goes through
the row's marks, a bitmap of 2 bits a position (selected, current) in int32 words, zeroed per
launch (one memset, sized for the call's longest session): atomic ORs set every valid entry's
mark, a barrier, and every entry reads the other set's bit at its position (from L2, where the
atomics act). Ranks are prefix sums, and two scatters through the scratch turn "k-th new
token" / "k-th free slot" into per-slot answers. Counts per row come back as a device tensor.
Rows wider than MAX_RETRIEVED fall back to the reference.
The marks replaced two sorts of each row (BLOCK_R int64 values) and binary searches in them;
they give the same sets, duplicates included (isin, as the reference). On an H200
(scripts/place_kernel_probe.py: the COPY=False plan with its memset, median of 50 launches;
bench/results/2026-12-02-h200-place-kernel-probe-*.json), 256 rows x R = 1024 took 13-18 us
against the sorts' 43-50 us at 32K positions, 15-20 us at 128K; 8 sessions (2,048 rows) 66-89
us against 300-356 us at 32K, 86-126 us at 128K (the memset and the marks' L2 footprint grow
with the positions). The kernel clearing only the words it uses, with no memset, cost more
(bench/results/2026-12-02-h200-place-kernel-variants.log: 21 against 15 + 3 us at 256 rows).

spill_ring_triton: copy tokens [start, end) from the window ring of every row into the
host pages (UVA writes into the pinned pool): the AppendNotice spill without a D2H sync.

store_tokens_triton: copy a block of tokens [l, 2, H, n, D] (an ingested layer, a chunk) into
the host pages in one launch (UVA writes), instead of one D2H copy per page.

Host pages are laid out [L, 2, H, P, D] (host_store.py); `page_base[i]` is the element
offset of the sequence's page i in the flat pool. Row b of the working set is layer b // H,
head b % H. Imported only when Triton is (see `_triton`).
"""

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kvrecall.kernels import placement, reference
from kvrecall.kernels._triton import next_power_of_2
from kvrecall.kernels.placement_staged import copy_staged

MAX_RETRIEVED = 4096  # a row's slots and their prefix sums stay in registers
# The compiled row sizes (the daemon's warm-up compiles each): a budget's kernel is one of these.
RETRIEVED_BLOCKS = (256, 1024, MAX_RETRIEVED)
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TILE_BYTES = 8192  # bytes of K (and as many of V) one copy step moves per program
# Per session of place_retrieved_many_triton: element offsets of its slot_pos, keys, values,
# page table and resident counter from the first session's, and its positions.
SESSION_FIELDS = tl.constexpr(6)


@triton.jit
def _mark_word(marks_ptr, pos):
    """The int32 word of `marks_ptr` holding position pos's two marks (16 positions a word)."""
    return marks_ptr + pos // 16


@triton.jit
def _mark_bit(pos, WHICH: tl.constexpr):
    """Position pos's mark in its word: bit 2 * (pos % 16) + WHICH (0: selected, 1: current)."""
    return tl.full(pos.shape, 1, tl.int32) << ((pos % 16) * 2 + WHICH).to(tl.int32)


@triton.jit
def _is_marked(marks_ptr, pos, ok, WHICH: tl.constexpr):
    """Whether each pos (where ok) carries mark WHICH. An L2 load (.cg): the marks were set by
    atomics, which act at L2, and an L1 line must not answer for them."""
    word = tl.load(_mark_word(marks_ptr, pos), mask=ok, other=0, cache_modifier=".cg")
    return ok & ((word & _mark_bit(pos, WHICH)) != 0)


@triton.jit
def _host_row(page_base_ptr, row, kv, pos, mask, tokens_per_page, num_kv_heads, D: tl.constexpr):
    """Element offset of (row = layer * H + head, kv, token pos) in the flat host pool."""
    layer = row // num_kv_heads
    head = row - layer * num_kv_heads
    page = pos // tokens_per_page
    base = tl.load(page_base_ptr + page, mask=mask, other=0)
    return (
        base + (((layer * 2 + kv) * num_kv_heads + head) * tokens_per_page + pos - page * tokens_per_page) * D
    )


@triton.jit(
    do_not_specialize=["R", "C", "first_slot", "sel_stride", "num_positions", "mark_words", "rows_per_session"]
)
def _place_kernel(
    slot_pos_ptr, keys_ptr, values_ptr, sel_ptr, host_ptr, page_base_ptr, scratch_ptr, marks_ptr, counts_ptr,
    resident_ptr, sessions_ptr, R, C, first_slot, sel_stride, num_positions, mark_words, tokens_per_page,
    num_kv_heads, rows_per_session,
    D: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    TRACK_RESIDENT: tl.constexpr, MANY: tl.constexpr, COPY: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # the row of the selection, scratch, marks and counts
    row = b  # the row of its session's working set and pages
    if MANY:  # session b // rows_per_session: its tensors at element offsets from the first session's
        session = sessions_ptr + (b // rows_per_session) * SESSION_FIELDS
        row = b % rows_per_session
        slot_pos_ptr += tl.load(session)
        keys_ptr += tl.load(session + 1)
        values_ptr += tl.load(session + 2)
        page_base_ptr += tl.load(session + 3)
        resident_ptr += tl.load(session + 4)
        num_positions = tl.load(session + 5)
    r = tl.arange(0, BLOCK_R)
    in_row = r < R
    region = slot_pos_ptr + row * C + first_slot
    cur = tl.load(region + r, mask=in_row, other=-1).to(tl.int64)
    sel = tl.load(sel_ptr + b * sel_stride + r, mask=in_row, other=-1).to(tl.int64)
    cur_ok = cur >= 0
    sel_ok = (sel >= 0) & (sel < num_positions)
    cur_in = cur_ok & (cur < num_positions)  # (a slot past the pages matches no valid selection)
    pos_of_rank = scratch_ptr + b * (2 * BLOCK_R)  # k-th new token's position
    slot_of_rank = pos_of_rank + BLOCK_R  # k-th free slot
    # Membership through the row's zeroed marks (2 bits a position): mark, then read each other's.
    marks = marks_ptr + b * mark_words
    tl.atomic_or(_mark_word(marks, sel), _mark_bit(sel, 0), mask=sel_ok, sem="relaxed")
    tl.atomic_or(_mark_word(marks, cur), _mark_bit(cur, 1), mask=cur_in, sem="relaxed")
    tl.debug_barrier()
    keep = _is_marked(marks, cur, cur_in, 0)
    new = sel_ok & ~_is_marked(marks, sel, sel_ok, 1)
    free = in_row & ~keep
    free_rank = tl.cumsum(free.to(tl.int32), 0) - 1
    new_rank = tl.cumsum(new.to(tl.int32), 0) - 1
    n_new = tl.sum(new.to(tl.int32), 0)
    filled = free & (free_rank < n_new)
    tl.store(pos_of_rank + new_rank, sel, mask=new)
    tl.store(slot_of_rank + free_rank, r.to(tl.int64), mask=filled)
    tl.debug_barrier()
    incoming = tl.load(pos_of_rank + free_rank, mask=filled, other=-1)
    final = tl.where(keep, cur, tl.where(filled, incoming, -1))
    tl.store(region + r, final.to(tl.int32), mask=in_row)
    tl.store(counts_ptr + 2 * b, tl.sum(sel_ok.to(tl.int32), 0))
    tl.store(counts_ptr + 2 * b + 1, n_new)
    if TRACK_RESIDENT:  # the row's filled slots, sinks and window included, into a running max
        resident = tl.sum((final >= 0).to(tl.int32), 0)
        for c0 in range(0, C, BLOCK_R):
            c = c0 + r
            outside = (c < C) & ((c < first_slot) | (c >= first_slot + R))
            held = tl.load(slot_pos_ptr + row * C + c, mask=outside, other=-1)
            resident += tl.sum((held >= 0).to(tl.int32), 0)
        tl.atomic_max(resident_ptr, resident.to(tl.int64))
    if not COPY:  # the copy engine moves the rows (placement_staged.py)
        return
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    for k0 in range(0, n_new, ROWS):
        k = k0 + tl.arange(0, ROWS)
        ok = k < n_new
        slot = tl.load(slot_of_rank + k, mask=ok, other=0)
        pos = tl.load(pos_of_rank + k, mask=ok, other=0)
        dst = ((row * C + first_slot + slot) * D)[:, None] + cols[None, :]
        mask = ok[:, None] & col_ok[None, :]
        for kv in tl.static_range(2):
            src = _host_row(page_base_ptr, row, kv, pos, ok, tokens_per_page, num_kv_heads, D)
            rows = tl.load(host_ptr + src[:, None] + cols[None, :], mask=mask)
            if kv == 0:
                tl.store(keys_ptr + dst, rows, mask=mask)
            else:
                tl.store(values_ptr + dst, rows, mask=mask)


@triton.jit
def _spill_tile(
    keys_ptr, values_ptr, host_ptr, page_base_ptr, b, t, start, n, C, ring_start, ring_size, tokens_per_page,
    num_kv_heads, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row b's tokens [start + t * ROWS, ...) of [start, start + n), from its ring slots into
    the host pages (spill_ring's and the notice kernel's copy)."""
    i = t * ROWS + tl.arange(0, ROWS)
    ok = i < n
    pos = start + i.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    src = ((b * C + ring_start + pos % ring_size) * D)[:, None] + cols[None, :]
    mask = ok[:, None] & (cols < D)[None, :]
    for kv in tl.static_range(2):
        dst = _host_row(page_base_ptr, b, kv, pos, ok, tokens_per_page, num_kv_heads, D)
        if kv == 0:
            rows = tl.load(keys_ptr + src, mask=mask)
        else:
            rows = tl.load(values_ptr + src, mask=mask)
        tl.store(host_ptr + dst[:, None] + cols[None, :], rows, mask=mask)


@triton.jit(do_not_specialize=["start", "n", "C", "ring_start", "ring_size"])
def _spill_kernel(
    keys_ptr, values_ptr, host_ptr, page_base_ptr,
    start, n, C, ring_start, ring_size, tokens_per_page, num_kv_heads,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    _spill_tile(
        keys_ptr, values_ptr, host_ptr, page_base_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), start, n, C,
        ring_start, ring_size, tokens_per_page, num_kv_heads, D, ROWS, BLOCK_D,
    )  # fmt: skip


@triton.jit(do_not_specialize=["start", "n", "first_row"])
def _store_kernel(
    kv_ptr, host_ptr, page_base_ptr,
    start, n, first_row, stride_l, stride_kv, stride_h, stride_t, tokens_per_page, num_kv_heads,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # local row: layer b // H of kv, head b % H
    i = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = i < n
    layer = b // num_kv_heads
    head = b - layer * num_kv_heads
    cols = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (cols < D)[None, :]
    for kv in tl.static_range(2):
        src = (layer * stride_l + kv * stride_kv + head * stride_h + i * stride_t)[:, None] + cols[None, :]
        rows = tl.load(kv_ptr + src, mask=mask)
        dst = _host_row(page_base_ptr, first_row + b, kv, start + i, ok, tokens_per_page, num_kv_heads, D)
        tl.store(host_ptr + dst[:, None] + cols[None, :], rows, mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as same-width integers: the copies move bits, whatever the dtype."""
    return t.view(_BITS_OF_SIZE[t.element_size()])


def _reachable(host: torch.Tensor, device: torch.device) -> bool:
    return host.device == device or host.is_pinned()


def _copy_tile(row_len: int, element_size: int) -> tuple[int, int]:
    block_d = next_power_of_2(row_len)
    return max(1, _TILE_BYTES // element_size // block_d), block_d


def place_retrieved_triton(
    slot_pos: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    selection: torch.Tensor,
    first_slot: int,
    host: torch.Tensor,
    page_base: torch.Tensor,
    tokens_per_page: int,
    num_kv_heads: int,
    resident_max: torch.Tensor | None,
    on_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Launch on checked arguments (see `kvrecall.kernels.place_retrieved`)."""
    rows, retrieved = slot_pos.shape[0], selection.shape[1]
    if (
        rows == 0
        or retrieved == 0
        or retrieved > MAX_RETRIEVED
        or not _reachable(host, keys.device)
        or keys.element_size() not in _BITS_OF_SIZE
    ):
        return placement.reported(reference.place_retrieved(
            slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
            resident_max,
        ), on_counts)  # fmt: skip
    return _launch_place(
        slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
        resident_max, None, rows, on_counts=on_counts,
    )  # fmt: skip


def _launch_place(
    slot_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: torch.Tensor, first_slot: int,
    host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int, num_kv_heads: int,
    resident_max: torch.Tensor | None, sessions: torch.Tensor | None, rows_per_session: int,
    parts: list[tuple[torch.Tensor, ...]] | None = None, on_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """One launch over every row of `selection` (sessions: see place_retrieved_many_triton;
    parts: every session's (keys, values, page_base), the first alone when None). With
    staged reads (`staged`) the kernel plans and placement_staged copies the rows (on_counts
    called before its plan's sync), else on_counts is called after the launch."""
    rows, retrieved = selection.shape
    counts = torch.empty(rows, 2, dtype=torch.int32, device=selection.device)  # the kernel writes every row
    block_r = next(size for size in RETRIEVED_BLOCKS if retrieved <= size)  # a few variants: see warmup
    scratch = torch.empty(rows, 2 * block_r, dtype=torch.int64, device=selection.device)
    # Each row's marks: 2 bits for each position of the longest session, zeroed (one memset:
    # cheaper on an H200 than the kernel clearing the words it uses, see the module docstring).
    positions = max(pages.numel() for _, _, pages in parts or [(keys, values, page_base)]) * tokens_per_page
    mark_words = max(1, -(-positions // 16))
    marks = torch.zeros(rows, mark_words, dtype=torch.int32, device=selection.device)
    copy_rows, block_d = _copy_tile(keys.shape[2], keys.element_size())
    stage = staged(host, keys, selection)
    _place_kernel[(rows,)](
        slot_pos, _bits(keys), _bits(values), selection, _bits(host), page_base, scratch, marks, counts,
        counts if resident_max is None else resident_max, counts if sessions is None else sessions,
        retrieved, slot_pos.shape[1], first_slot, selection.stride(0), page_base.numel() * tokens_per_page,
        mark_words, tokens_per_page, num_kv_heads, rows_per_session,
        D=keys.shape[2], BLOCK_R=block_r, ROWS=copy_rows, BLOCK_D=block_d,
        TRACK_RESIDENT=resident_max is not None, MANY=sessions is not None, COPY=not stage,
        num_warps=8 if block_r >= 1024 else 4,
    )  # fmt: skip
    if stage:
        parts = parts or [(keys, values, page_base)]
        copy_staged(
            scratch, counts, block_r, [(_bits(k), _bits(v), pages) for k, v, pages in parts], rows_per_session,
            first_slot, _bits(host), tokens_per_page, num_kv_heads, on_counts=on_counts,
        )  # fmt: skip
        return counts
    return placement.reported(counts, on_counts)


def staging_possible(keys: torch.Tensor, host: torch.Tensor) -> bool:
    """Whether the kernel runs on keys and the pool `host` (no reference fallback) and a staged
    placement can read the pool (placement.always_staged)."""
    return (
        _reachable(host, keys.device) and keys.element_size() in _BITS_OF_SIZE and host.device.type == "cpu"
        and keys.is_cuda and host.numel() % keys.shape[-1] == 0
    )  # fmt: skip


def staged(host: torch.Tensor, keys: torch.Tensor, selection: torch.Tensor) -> bool:
    """Whether a placement's rows travel by the copy engine (placement_staged.py): a background
    placement under host_reads=copy, or auto and small enough (placement.copy_reads; at most
    every selected token's K and V rows move), from a pinned pool that divides into whole rows."""
    most = selection.numel() * 2 * keys.shape[2] * keys.element_size()
    return placement.copy_reads(most) and host.device.type == "cpu" and keys.is_cuda and host.numel() % keys.shape[2] == 0


def place_retrieved_many_triton(
    parts: list[tuple[torch.Tensor, ...]], selection: torch.Tensor, first_slot: int, host: torch.Tensor,
    tokens_per_page: int, num_kv_heads: int, on_counts: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Launch on checked arguments (see `kvrecall.kernels.place_retrieved_many`): one program
    per row of every session, each session's tensors addressed by their element offsets from
    the first session's (one address space: device memory and the pinned pool). None where
    the kernel cannot run (the caller takes the reference)."""
    slot_pos, keys, values, page_base, resident_max = parts[0]
    retrieved = selection.shape[1]
    if (
        retrieved == 0
        or retrieved > MAX_RETRIEVED
        or not _reachable(host, keys.device)
        or keys.element_size() not in _BITS_OF_SIZE
    ):
        return None
    firsts = (slot_pos, _bits(keys), _bits(values), page_base, resident_max)
    table = []
    for part in parts:
        offsets = element_offsets((part[0], _bits(part[1]), _bits(part[2]), part[3], part[4]), firsts)
        if offsets is None:
            return None
        table.append([*offsets, part[3].numel() * tokens_per_page])
    sessions = torch.tensor(table, dtype=torch.int64)
    if selection.is_cuda:  # through pinned memory: no wait for the stream
        sessions = sessions.pin_memory().to(selection.device, non_blocking=True)
    return _launch_place(
        slot_pos, keys, values, selection, first_slot, host, page_base, tokens_per_page, num_kv_heads,
        resident_max, sessions, slot_pos.shape[0], [(part[1], part[2], part[3]) for part in parts],
        on_counts=on_counts,
    )  # fmt: skip


def element_offsets(tensors, firsts) -> list[int] | None:
    """Each tensor's distance from its counterpart in `firsts`, in its own elements (a kernel
    over many sessions addresses each session's tensors so); None where one is not a whole
    number of elements."""
    offsets = []
    for tensor, first in zip(tensors, firsts, strict=True):
        gap = tensor.data_ptr() - first.data_ptr()
        if gap % tensor.element_size():
            return None
        offsets.append(gap // tensor.element_size())
    return offsets


def spill_ring_triton(
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
) -> None:
    """Launch on checked arguments (see `kvrecall.kernels.spill_ring`)."""
    rows, capacity, dim = keys.shape
    if not _reachable(host, keys.device) or keys.element_size() not in _BITS_OF_SIZE:
        reference.spill_ring(
            keys, values, start, end, ring_start, ring_size, host, page_base, tokens_per_page, num_kv_heads
        )
        return
    n = end - start
    if rows == 0 or n <= 0:
        return
    copy_rows, block_d = _copy_tile(dim, keys.element_size())
    _spill_kernel[(rows, triton.cdiv(n, copy_rows))](
        _bits(keys), _bits(values), _bits(host), page_base,
        start, n, capacity, ring_start, ring_size, tokens_per_page, num_kv_heads,
        D=dim, ROWS=copy_rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def store_tokens_triton(
    kv: torch.Tensor, start: int, first_layer: int, host: torch.Tensor, page_base: torch.Tensor,
    tokens_per_page: int,
) -> None:
    """Launch on checked arguments (see `kvrecall.kernels.store_tokens`)."""
    layers, _, heads, n, dim = kv.shape
    if not _reachable(host, kv.device) or kv.element_size() not in _BITS_OF_SIZE or kv.stride(4) != 1:
        reference.store_tokens(kv, start, first_layer, host, page_base, tokens_per_page)
        return
    if layers == 0 or n == 0:
        return
    copy_rows, block_d = _copy_tile(dim, kv.element_size())
    _store_kernel[(layers * heads, triton.cdiv(n, copy_rows))](
        _bits(kv), _bits(host), page_base,
        start, n, first_layer * heads, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), tokens_per_page, heads,
        D=dim, ROWS=copy_rows, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
