"""The copy half of a background placement through the GPU's copy engine (placement_triton's
`staged`; background: kernels.background_reads, a retrieval the worker does not wait for).

The placement kernel reading the pinned pool over PCIe (UVA) holds the GPU's SMs while the
rows arrive: 3.1 ms for a fresh 32K retrieval and 5.6 ms at 128K on an H200
(bench/results/2026-11-30-h200-daemon-rt-ops-*.json), and a worker on the same GPU gets no
SM time meanwhile (CUDA contexts of two processes time-slice). Here the kernel only plans
(slot_pos, which token goes to which slot); then the host gathers the new tokens' rows from
the pool into pinned staging (CPU threads), one DMA moves them to the device (the copy
engine, which runs beside another process's kernels), and index_copy_ writes them into
their slots. The answer waits for the host gather (a sync after the plan); the worker's
steps do not.
"""

from __future__ import annotations

import threading

import torch

from kvrecall.kernels._checks import check_int

# Rows (of D elements) the host gathers before handing them to the copy engine: about 16 MiB
# of bf16 at D = 128, so the DMA of one chunk overlaps the gather of the next.
CHUNK_ROWS = 65536


def copy_staged(
    scratch: torch.Tensor, counts: torch.Tensor, block_r: int, sessions: list[tuple[torch.Tensor, ...]],
    rows_per_session: int, first_slot: int, host: torch.Tensor, tokens_per_page: int, num_kv_heads: int,
) -> None:  # fmt: skip
    """Copy the new tokens a COPY=False placement planned into their slots.

    scratch [S * B, 4 * block_r] int64 (per row: sorted selection, sorted current, the k-th new
    token's position, the k-th free slot), counts [S * B, 2] int32 (selected, new); sessions:
    per session (keys, values [B, C, D] as same-width integers, page_base [pages] int64);
    host: the flat pinned pool as the same integers. Rows are layer b // H, head b % H."""
    check_int("block_r", block_r, 1)
    device = scratch.device
    D = sessions[0][0].shape[2]
    C = sessions[0][0].shape[1]
    H, P = num_kv_heads, tokens_per_page
    take = torch.arange(block_r, device=device)[None, :] < counts[:, 1:2].to(torch.int64)
    row, rank = take.nonzero().unbind(1)  # row-major: each session's entries are one run
    if row.numel() == 0:
        return
    position = scratch[row, 2 * block_r + rank]
    slot = scratch[row, 3 * block_r + rank]
    session = row // rows_per_session
    local = row - session * rows_per_session
    layer, head = local // H, local % H
    page = position // P
    tables = torch.nn.utils.rnn.pad_sequence([part[2] for part in sessions], batch_first=True)
    base = tables[session, page]
    key_offset = base + (((layer * 2) * H + head) * P + position - page * P) * D
    source = torch.cat((key_offset, key_offset + H * P * D)) // D  # K rows, then V rows, of the pool
    target = local * C + first_slot + slot
    pin = device.type == "cuda"  # (a CPU run, under Triton's interpreter, tests the same steps)
    source_host = torch.empty(source.shape, dtype=torch.int64, pin_memory=pin)
    source_host.copy_(source, non_blocking=True)
    ends = torch.searchsorted(session, torch.arange(1, len(sessions) + 1, device=device))
    ends_host = ends.cpu()  # the one sync: the host needs the rows it gathers
    pool_rows = host[: host.numel() // D * D].view(-1, D)
    staged = torch.empty((source.numel(), D), dtype=host.dtype, pin_memory=pin)
    rows = torch.empty((source.numel(), D), dtype=host.dtype, device=device)
    copies = _copy_stream(device) if pin else None
    if copies is not None:
        copies.wait_stream(torch.cuda.current_stream(device))  # after the plan (and target)
        target.record_stream(copies)  # the caching allocator must not reuse it before the copies ran
        rows.record_stream(copies)
    # The host gathers a chunk while the copy engine moves the one before (CPU threads, then DMA).
    for lo in range(0, source.numel(), CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, source.numel())
        torch.index_select(pool_rows, 0, source_host[lo:hi], out=staged[lo:hi])
        with torch.cuda.stream(copies):  # (None: the current stream)
            rows[lo:hi].copy_(staged[lo:hi], non_blocking=pin)
    n = row.numel()
    start = 0
    with torch.cuda.stream(copies):
        for (keys, values, _), end in zip(sessions, ends_host.tolist(), strict=True):
            if end > start:
                where = target[start:end]
                keys.view(-1, D).index_copy_(0, where, rows[start:end])
                values.view(-1, D).index_copy_(0, where, rows[n + start : n + end])
            start = end
    if copies is not None:
        # Done before the caller answers; the daemon's own stream never queues these copies, so
        # an AppendNotice's sync on it does not wait for a retrieval's rows.
        copies.synchronize()


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
