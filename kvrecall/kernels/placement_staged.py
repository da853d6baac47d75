"""The copy half of a background placement through the GPU's copy engine (placement_triton's
`staged`; background: kernels.background_reads, a retrieval the worker does not wait for).

The placement kernel reading the pinned pool over PCIe (UVA) holds the GPU's SMs while the
rows arrive: 3.1 ms for a fresh 32K retrieval and 5.6 ms at 128K on an H200
(bench/results/2026-11-30-h200-daemon-rt-ops-*.json), and a worker on the same GPU gets no
SM time meanwhile (CUDA contexts of two processes time-slice). Here the kernel only plans
(slot_pos, which token goes to which slot); then the host gathers the new tokens' rows from
the pool into pinned staging (CPU threads), one DMA moves them to the device (the copy
engine, which runs beside another process's kernels), and index_copy_ writes them into
their slots (queued on the caller's stream behind the transfers). The answer waits for the
host gather (one sync after the plan) and the caller's sync; the worker's steps do not.

Worker copies (the daemon's `worker_copy_share`; a caller's StepEvent.worker_copies): a session
whose working-set segment has a staging area (`Staging`) and whose new rows fit in it gets
them there instead, with their target rows, and no index copy of the daemon's: the worker
copies them into their slots (`apply_staged`) in its own CUDA context before it reads the
retrieved region again, so the retrieval launches two kernels fewer in the daemon's context
(which a worker on the same GPU pays for in time slices). A CPU daemon stages by the PyTorch
reference (`place_staged_reference`), so the protocol and the engine's use of it run in CI.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvrecall import launch_gate
from kvrecall.kernels import reference
from kvrecall.kernels._checks import check_int
from kvrecall.kernels.staged_plan import staged_plan
from kvrecall.phases import mark

# Rows (of D elements) the host gathers before handing them to the copy engine: about 16 MiB
# of bf16 at D = 128, so the DMA of one chunk overlaps the gather of the next.
CHUNK_ROWS = 65536
_skip_index_copies = False  # the daemon's dry_index_copies diagnostic (configure)
_skip_uploads = False  # the daemon's dry_uploads diagnostic (configure)
_skip_transfers = False  # the daemon's dry_transfers diagnostic (configure)
_index_scratch = False  # the daemon's dry_index_scratch diagnostic (configure)
_index_share = 1.0  # the daemon's dry_index_share diagnostic (configure)
_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # its stand-in working sets, by shape
_index_defer = False  # the daemon's dry_index_defer diagnostic (configure)
_DEFERRED: list[tuple[torch.cuda.Event | None, tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]]] = []
_DEFERRED_LOCK = threading.Lock()
_skip_plan_sync = False  # the daemon's dry_plan_sync diagnostic (configure)
_plan_readback = "mapped"  # the daemon's plan_readback (configure)


@dataclass
class Staging:
    """One session's staging area (views into its working-set segment): keys and values [S, D]
    and their target rows [S] int64 (flat rows of keys.view(-1, D)); `rows`: how many the last
    staged placement left there for the worker (0: the daemon copied them itself)."""

    keys: torch.Tensor
    values: torch.Tensor
    targets: torch.Tensor
    rows: int = 0

    @property
    def capacity(self) -> int:
        return self.targets.numel()


_scope = threading.local()


@contextlib.contextmanager
def worker_copies(stagings: dict[int, Staging]):
    """Staged placements of this thread inside the block stage the rows of the sessions in
    `stagings` (keyed by their keys' data_ptr) for their workers where they fit; each
    Staging's `rows` is set (0 where the daemon copied)."""
    before = getattr(_scope, "stagings", None)
    for staging in stagings.values():
        staging.rows = 0
    _scope.stagings = stagings
    try:
        yield
    finally:
        _scope.stagings = before


def staging_for(keys: torch.Tensor) -> Staging | None:
    """The staging area this thread's worker_copies block gives the session whose keys these are."""
    stagings = getattr(_scope, "stagings", None) or {}
    return stagings.get(keys.data_ptr())


def place_staged_reference(
    slot_pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, selection: torch.Tensor, first_slot: int,
    host: torch.Tensor, page_base: torch.Tensor, tokens_per_page: int, num_kv_heads: int,
    resident_max: torch.Tensor | None, staging: Staging,
) -> torch.Tensor:  # fmt: skip
    """Worker copies by the PyTorch reference (a CPU daemon's): kernels.place_retrieved's
    placement (arguments and counts the same) with the new tokens' rows left in `staging` and
    their targets (flat rows of keys [B, C, D]) where they fit (staging.rows; keys and values
    untouched), else written in place (staging.rows 0). Slot positions are placed in place. The
    plan is the reference's (plan_placement); the new rows go from the host pages straight into
    the staging area."""
    rows, retrieved = slot_pos.shape[0], selection.shape[1]
    staging.rows = 0
    if not (rows and retrieved):
        return reference.place_retrieved(slot_pos, keys, values, selection, first_slot, host, page_base,
                                         tokens_per_page, num_kv_heads, resident_max)  # fmt: skip
    counts, row, positions, targets = reference.plan_placement(slot_pos, selection, first_slot, page_base,
                                                               tokens_per_page)  # fmt: skip
    n, D = row.numel(), keys.shape[-1]
    if n <= staging.capacity:  # the new rows into the staging area, their slots beside them
        into, dst = (staging.keys.view(-1), staging.values.view(-1)), torch.arange(n, device=staging.keys.device) * D
        staging.targets[:n] = targets
        staging.rows = n
    else:  # it does not fit: written in place
        into, dst = (keys.view(-1), values.view(-1)), targets * D
    reference.copy_host_rows(host, page_base, row, positions, tokens_per_page, num_kv_heads, *into, dst, D)
    reference.note_resident(slot_pos, resident_max)
    return counts


def apply_staged(keys: torch.Tensor, values: torch.Tensor, staging: Staging, rows: int) -> None:
    """The worker's half: the first `rows` staged K / V rows into their slots of keys / values
    (any shape ending in D, contiguous: rows are flat), on the current stream. PyTorch reference
    and implementation at once (two index_copy_ of 8-byte words)."""
    if rows <= 0:
        return
    if rows > staging.capacity:
        raise ValueError(f"rows: {rows} staged rows, the staging area holds {staging.capacity}")
    D = keys.shape[-1]
    where = staging.targets[:rows]
    _as_words(keys.view(-1, D)).index_copy_(0, where, _as_words(staging.keys[:rows]))
    _as_words(values.view(-1, D)).index_copy_(0, where, _as_words(staging.values[:rows]))


def configure(dry_index_copies: bool, dry_uploads: bool = False, dry_plan_sync: bool = False,
              plan_readback: str = "mapped", dry_transfers: bool = False, dry_index_scratch: bool = False,
              dry_index_share: float = 1.0, dry_index_defer: bool = False) -> None:  # fmt: skip
    """The daemon's `dry_index_copies`: staged rows reach the device, never their slots; its
    `dry_uploads`: they are not even gathered and moved (the plan and its sync alone); its
    `dry_plan_sync`: nor is the plan read back (no sync in the middle of the call); its
    `dry_transfers`: the rows are neither gathered nor moved, but zeros are index-copied into
    their slots (the index copies without the copy engine's transfers before them); its
    `dry_index_scratch`: the rows are gathered, moved and index-copied as always, but into a
    stand-in of the session's working set that no worker reads (the same kernels at the same
    moment, another destination); its `dry_index_share` (< 1): the index copies take only that
    share of each session's rows (at least one: at 0 the launches alone); its `dry_index_defer`:
    a call's index copies are launched at the start of the next staged placement's (beside its
    plan kernel: one burst of the daemon's kernels a call, not two), never waited for by the call
    that planned them (its answer may come before its rows are in place). Its `plan_readback`:
    "mapped", the plan kernel writes the plan into the pinned buffer the host reads; "copy", a
    DMA copies it there after the kernel."""
    global _skip_index_copies, _skip_uploads, _skip_plan_sync, _plan_readback, _skip_transfers, _index_scratch
    global _index_share, _index_defer
    if not 0 <= dry_index_share <= 1:
        raise ValueError(f"dry_index_share: {dry_index_share} is not in [0, 1]")
    if plan_readback not in ("mapped", "copy"):
        raise ValueError(f"plan_readback: {plan_readback!r} is neither 'mapped' nor 'copy'")
    _plan_readback = plan_readback
    _skip_index_copies = bool(dry_index_copies or dry_uploads or dry_plan_sync)
    _skip_uploads = bool(dry_uploads or dry_plan_sync)
    _skip_plan_sync = bool(dry_plan_sync)
    _skip_transfers = bool(dry_transfers) and not _skip_uploads
    _index_scratch = bool(dry_index_scratch) and not _skip_index_copies
    _index_share = float(dry_index_share)
    _index_defer = bool(dry_index_defer) and not _skip_index_copies
    _SCRATCH.clear()
    with _DEFERRED_LOCK:
        _DEFERRED.clear()


def _flush_deferred(device: torch.device) -> None:
    """The dry_index_defer diagnostic: launch the index copies earlier calls left (on the current
    stream, after the transfers they copy)."""
    with _DEFERRED_LOCK:
        pending = list(_DEFERRED)
        _DEFERRED.clear()
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    for moved, copies in pending:
        if moved is not None:
            stream.wait_event(moved)
        if stream is not None:
            for t in (t for copy in copies for t in copy):
                t.record_stream(stream)
        _index_copies(copies)


def _index_copies(copies) -> None:
    """Each (into, where, rows): rows into `into`'s rows `where` (index_copy_, on the current stream)."""
    for into, where, rows in copies:
        into.index_copy_(0, where, rows)


def _recorded(pin: bool) -> torch.cuda.Event | None:
    """An event recorded on the current stream (on a GPU; None on a CPU run)."""
    if not pin:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def copy_staged(
    scratch: torch.Tensor, counts: torch.Tensor, block_r: int, sessions: list[tuple[torch.Tensor, ...]],
    rows_per_session: int, first_slot: int, host: torch.Tensor, tokens_per_page: int, num_kv_heads: int,
    on_counts: Callable[[torch.Tensor], None] | None = None,
) -> None:  # fmt: skip
    """Copy the new tokens a COPY=False placement planned into their slots.

    scratch [S * B, 2 * block_r] int64 (per row: the k-th new token's position, then the k-th
    free slot), counts [S * B, 2] int32 (selected, new); sessions:
    per session (keys, values [B, C, D] as same-width integers, page_base [pages] int64);
    host: the flat pinned pool as the same integers. Rows are layer b // H, head b % H.

    One host sync (the rows to gather): every entry's pool row and slot are worked out over
    the whole [S * B, block_r] grid and compacted on the device (a prefix sum, no nonzero),
    and the index copies into the working sets are queued on the caller's stream behind the
    copy engine's transfers: the caller's own sync before it answers covers them. (On an
    H200 beside a decoding worker every sync waits for a time slice, about 1.5 ms: a 32K x 8
    retrieval answered in 27 ms with three per placement.) on_counts(counts) is called before
    that sync, so its launches join the plan's: with every session's rows staged for its worker
    (worker_copies) nothing but the copy engine's work follows the sync, and a worker on the
    same GPU is preempted for one burst of the daemon's kernels, not two."""
    check_int("block_r", block_r, 1)
    device = scratch.device
    if _index_defer:
        _flush_deferred(device)
    D = sessions[0][0].shape[2]
    C = sessions[0][0].shape[1]
    H, P = num_kv_heads, tokens_per_page
    R = scratch.shape[0]
    tables = torch.nn.utils.rnn.pad_sequence([part[2] for part in sessions], batch_first=True)
    whole = R * block_r
    pin = device.type == "cuda"  # (a CPU run, under Triton's interpreter, tests the same steps)
    # The plan straight into the host buffer the host reads (mapped: the kernel's own stores over
    # PCIe), or copied there after the kernel (copy): key rows [0, whole), row ends [whole, + R).
    # Under dry_plan_sync there is none: nothing would wait for the kernel before it went back.
    # With a staging area in any session (worker copies) the targets too, from [whole + R, + whole):
    # its rows' targets reach the staging area by a DMA from there, not a device copy of the daemon's.
    stagings = [staging_for(part[0]) for part in sessions]  # (None: the daemon copies that session's rows)
    mapped_targets = any(staging is not None for staging in stagings) and _plan_readback == "mapped"
    buffer = None if _skip_plan_sync else _PLANS.take(whole + R + (whole if mapped_targets else 0), pin)
    mapped = buffer is not None and _plan_readback == "mapped"
    held = None  # the buffer, kept until the DMA of its targets is queued (mapped_targets)
    try:
        # The pool row and working-set row of every new token, compacted in row order (one launch:
        # staged_plan_triton; this path runs only where the placement kernel does).
        packed, targets, ends = staged_plan(
            scratch, counts, block_r, tables, rows_per_session, first_slot, H, P, D, C, impl="triton",
            rows_out=buffer[:whole] if mapped else None, ends_out=buffer[whole : whole + R] if mapped else None,
            targets_out=buffer[whole + R : whole + R + whole] if mapped and mapped_targets else None,
        )  # fmt: skip
        if buffer is None:  # (the diagnostic: the slot positions are placed, the plan never read)
            if on_counts is not None:
                on_counts(counts)
            mark("place_launch")
            return
        # The one sync: the host needs the rows it gathers (and how many there are).
        if not mapped:
            buffer[:whole].copy_(packed[:whole], non_blocking=pin)
            buffer[whole : whole + R].copy_(ends, non_blocking=pin)
        if on_counts is not None:
            on_counts(counts)
        mark("place_launch")
        launch_gate.release()  # (a retrieval's gated launches run now: the sync below needs them)
        if pin:
            torch.cuda.current_stream(device).synchronize()
        mark("plan_sync")
        ends_host = buffer[whole + rows_per_session - 1 : whole + R : rows_per_session].tolist()  # per session
        n = ends_host[-1]
        source_host = torch.cat((buffer[:n], buffer[:n] + H * P))  # K rows, then V rows
        if mapped_targets and n > 0 and not _skip_uploads:
            held, buffer = buffer, None
    finally:
        if buffer is not None:
            _PLANS.give(buffer)
    if n == 0 or _skip_uploads:
        return
    pool_rows = host[: host.numel() // D * D].view(-1, D)
    # Where each gathered row goes: a session's rows to its staging area where the caller asked
    # (worker_copies) and they fit, the rest to `rows` (K rows [0, n), V rows [n, 2n)) for the
    # index copies below. Pieces (first source row, end, destination, its first row).
    staged: list[Staging | None] = []
    start = 0
    for staging, end in zip(stagings, ends_host, strict=True):
        fits = staging is not None and end - start <= staging.capacity
        staged.append(staging if fits else None)
        if fits:
            staging.rows = end - start
        start = end
    daemon_copies = any(staging is None for staging in staged)
    rows = None
    if daemon_copies:
        # A size rounded up to whole chunks: the caching allocator finds the blocks of earlier calls.
        shape = (-(-2 * n // CHUNK_ROWS) * CHUNK_ROWS, D)
        rows = (torch.zeros if _skip_transfers else torch.empty)(shape, dtype=host.dtype, device=device)
    pieces = _pieces(ends_host, staged, rows, n, host.dtype)
    copies = _copy_stream(device) if pin else None
    if copies is not None:
        copies.wait_stream(torch.cuda.current_stream(device))  # after the plan
        if rows is not None:
            rows.record_stream(copies)  # the caching allocator must not reuse it before the copies ran
        if held is None and any(staging is not None for staging in staged):
            targets.record_stream(copies)  # (read there: the staged sessions' targets, without a mapped plan)
    with torch.cuda.stream(copies):  # the staged sessions' target rows (from the host's plan, else on the device)
        start = 0
        for staging, end in zip(staged, ends_host, strict=True):
            if staging is not None and end > start:
                source = held[whole + R + start : whole + R + end] if held is not None else targets[start:end]
                staging.targets[: end - start].copy_(source, non_blocking=pin)
            start = end
        if held is not None:  # (back for reuse once those DMAs have read it)
            _PLANS.give(held, _recorded(pin))
    if not _skip_transfers:
        gather_upload(pool_rows, source_host, pieces, copies, pin)
    if copies is not None:
        torch.cuda.current_stream(device).wait_stream(copies)  # the index copies after the DMAs
    start = 0
    wide = _as_words(rows) if rows is not None else None  # index_copy_ moves an element per thread: 8-byte words
    deferred: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for (keys, values, _), end, staging in zip(sessions, ends_host, staged, strict=True):
        if end > start and staging is None and not _skip_index_copies:
            # (the dry_index_share diagnostic: a share of the rows, at least one)
            last = end if _index_share >= 1 else start + max(1, round(_index_share * (end - start)))
            where = targets[start:last]
            if _index_scratch:  # (the dry_index_scratch diagnostic: a destination no worker reads)
                keys, values = _scratch_like(keys)
            kv = [(_as_words(keys.view(-1, D)), where, wide[start:last]),
                  (_as_words(values.view(-1, D)), where, wide[n + start : n + last])]  # fmt: skip
            if _index_defer:  # (the dry_index_defer diagnostic: launched by the next staged placement)
                deferred += kv
            else:
                _index_copies(kv)
        start = end
    if deferred:
        with _DEFERRED_LOCK:
            _DEFERRED.append((_recorded(pin), tuple(deferred)))
    mark("index_copies")


def _scratch_like(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two private tensors of `keys`' shape, dtype and device (made once per shape): where the
    dry_index_scratch diagnostic index-copies a session's rows instead of its working set."""
    key = (tuple(keys.shape), keys.dtype, keys.device)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.empty_like(keys), torch.empty_like(keys))
    return _SCRATCH[key]


def gather_upload(
    pool_rows: torch.Tensor, source_host: torch.Tensor, pieces: list[tuple[int, int, torch.Tensor, int]],
    copies: torch.cuda.Stream | None, pin: bool,
) -> None:  # fmt: skip
    """Rows `source_host` [N] (indices into pool_rows [*, D], the host pool) to their pieces
    ((first, end, destination, its first row): gathered row k goes to destination row
    at + k - first): the host gathers a chunk into pinned staging (CPU threads) while the copy
    engine moves the one before (on `copies`; None: the current stream), through two chunks
    taken from STAGING for the call."""
    count = min(2, -(-source_host.numel() // CHUNK_ROWS))
    chunks = [STAGING.take(pool_rows.dtype, pool_rows.shape[1], pin) for _ in range(count)]
    moved: list[torch.cuda.Event | None] = [None] * len(chunks)
    try:
        for k, lo in enumerate(range(0, source_host.numel(), CHUNK_ROWS)):
            hi = min(lo + CHUNK_ROWS, source_host.numel())
            chunk, done = chunks[k % 2][: hi - lo], moved[k % 2]
            if done is not None:
                done.synchronize()  # the DMA that read this chunk two steps ago (the copy engine's)
                mark("dma_wait")
            torch.index_select(pool_rows, 0, source_host[lo:hi], out=chunk)
            mark("gather")
            with torch.cuda.stream(copies):  # (None: the current stream)
                for first, last, into, at in pieces:
                    a, b = max(first, lo), min(last, hi)
                    if a < b:
                        into[at + a - first : at + b - first].copy_(chunk[a - lo : b - lo], non_blocking=pin)
                moved[k % 2] = _recorded(pin)
            mark("dma_launch")
    finally:
        for chunk, done in zip(chunks, moved, strict=True):
            STAGING.give(chunk, done)  # reused once its DMA is done (the next taker waits)


def _pieces(
    ends: list[int], staged: list[Staging | None], rows: torch.Tensor | None, n: int, rows_dtype: torch.dtype,
) -> list[tuple[int, int, torch.Tensor, int]]:  # fmt: skip
    """Where the gathered rows [0, 2n) (K rows of every session, then V rows) go: (first, end,
    destination, its first row) pieces, a staged session's K and V to its staging area, the
    rest to `rows` at their own indices (runs of them merged: without staging, one piece)."""
    pieces: list[tuple[int, int, torch.Tensor, int]] = []
    for half in (0, 1):
        start = 0
        for end, staging in zip(ends, staged, strict=True):
            if end > start:
                first, last = half * n + start, half * n + end
                if staging is not None:  # (seen as the rows' integer type: the bits, not the values)
                    into = staging.values if half else staging.keys
                    pieces.append((first, last, into.view(rows_dtype), 0))
                elif pieces and pieces[-1][2] is rows and pieces[-1][1] == first:
                    pieces[-1] = (pieces[-1][0], last, rows, pieces[-1][3])
                else:
                    pieces.append((first, last, rows, first))
            start = end
    return pieces


def _as_words(rows: torch.Tensor) -> torch.Tensor:
    """rows [N, D] seen as 8-byte integers [N, D * size / 8] where the row's bytes allow (the
    same bytes: a copy of either moves the same bits), else as they are. On an H200 index_copy_
    of 2-byte elements took 0.2 ms of a 32K retrieval's 1.2 ms of daemon kernels (bench/results/
    2026-12-01-h200-kernels32k-daemon-kernels.json), time the workers on that GPU lose."""
    if (rows.shape[1] * rows.element_size()) % 8 or rows.element_size() >= 8:
        return rows
    return rows.view(torch.int64)


class StagingChunks:
    """Host staging chunks of CHUNK_ROWS rows, reused by every call. A pinned allocation of a
    size PyTorch's host allocator has not cached is a cudaHostAlloc, and a staging buffer the
    size of the whole retrieval (0.5 GiB at 64 sequences) met new sizes all the time; single
    answers of 0.3-0.8 s in `bench e2e` (32K x 8, 64 sequences) are suspected to be those. A
    call takes at most two (double buffering) and gives them back; there are as many as calls
    have needed at once."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, int, bool], list[tuple[torch.Tensor, torch.cuda.Event | None]]] = {}
        self._lock = threading.Lock()

    def take(self, dtype: torch.dtype, row_len: int, pin: bool) -> torch.Tensor:
        with self._lock:
            free = self._free.get((dtype, row_len, pin))
            chunk, done = free.pop() if free else (None, None)
        if done is not None:
            done.synchronize()  # the DMA that last read it (given back before it ended)
        return chunk if chunk is not None else torch.empty((CHUNK_ROWS, row_len), dtype=dtype, pin_memory=pin)

    def give(self, chunk: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        """Back for reuse; `done`: the event of the last DMA reading it."""
        with self._lock:
            self._free.setdefault((chunk.dtype, chunk.shape[1], chunk.is_pinned()), []).append((chunk, done))


class PlanBuffers:
    """Host buffers for placements' plans (int64; pinned on a GPU: a non-blocking copy, then one
    stream sync), shared by the daemon's threads: a call takes one at least its size (a power
    of two) and gives it back, so there are as many as calls have needed at once."""

    def __init__(self) -> None:
        self._free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._lock = threading.Lock()

    def take(self, numel: int, pin: bool) -> torch.Tensor:
        with self._lock:
            fits = [(b, done) for b, done in self._free if b.numel() >= numel and b.is_pinned() == pin]
            if fits:
                buffer, done = min(fits, key=lambda entry: entry[0].numel())
                self._free = [entry for entry in self._free if entry[0] is not buffer]
                if done is not None:
                    done.synchronize()  # the DMA that last read it (given back before it ended)
                return buffer
        return torch.empty(1 << max(16, (numel - 1).bit_length()), dtype=torch.int64, pin_memory=pin)

    def give(self, buffer: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        """Back for reuse; `done`: the event of the last DMA reading it."""
        with self._lock:
            self._free.append((buffer, done))


STAGING = StagingChunks()
_PLANS = PlanBuffers()
_STREAMS: dict[tuple[int, int | None], torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's copy stream on `device` (the daemon serves calls in threads; one
    stream each, so two retrievals' copies do not wait on each other)."""
    key = (threading.get_ident(), device.index)
    with _STREAMS_LOCK:
        stream = _STREAMS.get(key)
        if stream is None:
            stream = _STREAMS[key] = torch.cuda.Stream(device)
        return stream
