"""spill_evict_many on the GPU (see `kvrecall.kernels.notice`): one launch over every row of
every session. Program (r, t) serves row r % B of session r // B: it spills tile t of the
session's new ring tokens into the host pages (UVA writes into the pinned pool, as
spill_ring); tile 0 also empties the row's ring slots of the tokens that left the window,
sums their keys (float32) and raises the session's resident counter to the row's count.
Each session's tensors are addressed at element offsets from the first session's (one
address space: device memory and the pinned pool). Imported only when Triton is."""

import torch
import triton
import triton.language as tl

from kvrecall.kernels.placement_triton import _copy_tile, _reachable, _spill_tile, element_offsets

# Per session: element offsets of its slot_pos, keys, values, page table and resident counter
# from the first session's, then its spill start and count, and its eviction [low, high).
SESSION_FIELDS = tl.constexpr(9)
_BLOCK_W = 64  # ring slots one step of the eviction loop reads
_BLOCK_C = 1024  # slots one step of the resident count reads


@triton.jit(do_not_specialize=["C", "ring_start", "ring_size", "rows", "tokens_per_page"])
def _notice_kernel(
    slot_pos_ptr, keys_ptr, values_ptr, host_ptr, page_base_ptr, resident_ptr, sums_ptr, sessions_ptr,
    C, ring_start, ring_size, rows, tokens_per_page, num_kv_heads,
    D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    SUMS: tl.constexpr, CLEAR: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    s = r // rows
    b = r - s * rows
    session = sessions_ptr + s * SESSION_FIELDS
    slot_pos = slot_pos_ptr + tl.load(session) + b * C
    keys = keys_ptr + tl.load(session + 1)
    values = values_ptr + tl.load(session + 2)
    pages = page_base_ptr + tl.load(session + 3)
    # 1. the spill: tile t of tokens [start, start + n)
    _spill_tile(
        keys, values, host_ptr, pages, b, t, tl.load(session + 5), tl.load(session + 6), C, ring_start, ring_size,
        tokens_per_page, num_kv_heads, D, ROWS, BLOCK_D,
    )  # fmt: skip
    if t == 0:
        # 4 (counted first). the row's filled slots before the clear; the clear's count comes
        # off below. No other program writes the row; the barrier keeps this program's own
        # stores after every one of its loads here.
        resident = 0
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            resident += tl.sum((tl.load(slot_pos + c, mask=c < C, other=-1) >= 0).to(tl.int32), 0)
        tl.debug_barrier()
        # 2-3. the ring slots of tokens in [low, high) empty; their keys summed
        low, high = tl.load(session + 7), tl.load(session + 8)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        total = tl.zeros([BLOCK_D], tl.float32)
        cleared_count = 0
        for w0 in range(0, ring_size, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            in_ring = w < ring_size
            held = tl.load(slot_pos + ring_start + w, mask=in_ring, other=-1)
            cleared = in_ring & (held >= low) & (held < high)
            if SUMS:
                rows_at = ((b * C + ring_start + w) * D)[:, None] + cols[None, :]
                left = tl.load(keys + rows_at, mask=cleared[:, None] & col_ok[None, :], other=0.0)
                total += tl.sum(left.to(tl.float32), 0)
            if CLEAR:
                tl.store(slot_pos + ring_start + w, tl.full([BLOCK_W], -1, tl.int32), mask=cleared)
            # Emptied either way (slots evicted earlier and left in place hold positions < low).
            cleared_count += tl.sum((in_ring & (held >= 0) & (held < high)).to(tl.int32), 0)
        if SUMS:
            tl.store(sums_ptr + r * D + cols, total, mask=col_ok)
        tl.atomic_max(resident_ptr + tl.load(session + 4), (resident - cleared_count).to(tl.int64))


def spill_evict_many_triton(parts, spills, evictions, ring_start, ring_size, host, tokens_per_page, num_kv_heads,
                            sums, clear: bool = True) -> bool:  # fmt: skip
    """Launch on checked arguments (see `kvrecall.kernels.spill_evict_many`); False (nothing
    written) where the pool is not reachable from the device or the sessions' tensors are not
    at whole-element distances."""
    slot_pos, keys, values, page_base, resident_max = parts[0]
    if not _reachable(host, keys.device) or keys.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    firsts = (slot_pos, keys, values, page_base, resident_max)
    table = []
    for part, (start, end), (low, high) in zip(parts, spills, evictions, strict=True):
        offsets = element_offsets(part, firsts)
        if offsets is None:
            return False
        table.append([*offsets, start, end - start, low, high])
    sessions = torch.tensor(table, dtype=torch.int64)
    if keys.is_cuda:  # through pinned memory: no wait for the stream
        sessions = sessions.pin_memory().to(keys.device, non_blocking=True)
    rows, capacity, dim = keys.shape
    copy_rows, block_d = _copy_tile(dim, keys.element_size())
    tiles = max(1, triton.cdiv(max(end - start for start, end in spills), copy_rows))
    _notice_kernel[(len(parts) * rows, tiles)](
        slot_pos, keys, values, host, page_base, resident_max, sums if sums is not None else resident_max, sessions,
        capacity, ring_start, ring_size, rows, tokens_per_page, num_kv_heads,
        D=dim, ROWS=copy_rows, BLOCK_D=block_d, BLOCK_W=_BLOCK_W, BLOCK_C=_BLOCK_C, SUMS=sums is not None,
        CLEAR=clear, num_warps=4,
    )  # fmt: skip
    return True
