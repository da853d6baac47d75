"""Batched decode over B sessions' working sets, each its own allocation (CUDA IPC mapped).

A decode engine that batches B sequences cannot stack their working sets: each session's
[sinks | retrieved | window] tensors are a separate allocation the daemon shares with the
worker (a worker maps its own sessions' memory and nothing else). So both ops read
*offset tables*: int64 [B] element offsets of every sequence's keys, values, slot_pos and
query tensors from one aligned anchor tensor, plus int32 [B] per-sequence geometry (capacity, window start, window size;
capacity 0 = an empty batch slot; and the deferred-eviction mask, below). The tables are ordinary device tensors, so a captured
CUDA graph stays valid when sequences join or leave: only the tables' contents change.

* `write_step`: the step's new K/V [B, H, D] of one layer go into each sequence's window
  ring slot (window_start + position % window) with slot_pos = position, and its query
  [B, Hq, D] into the session's query tensor (what the daemon retrieves for at a boundary).
* `attend`: decode attention of q [B, Hq, D] over each sequence's slots of one layer whose
  slot_pos >= 0; GQA native (the G query heads of a KV head share one pass over its keys),
  split over the slots (flash-decoding) and combined by a second launch.

Deferred eviction (OpenSessionRequest.deferred_eviction): the daemon leaves the ring slots
an AppendNotice evicts in place and may fill retrieved slots with those tokens while the
step runs, so a slot is read only where `ring_from` <= position (ring slots) or position <
`kept_below` (sinks and retrieved slots): both are the session's evicted boundary as of the
last answer the worker took, so what the step reads does not depend on when the daemon
works. Other sessions: 0 and INT32_MAX (every filled slot).

Working-set layout per sequence (WorkingSetInfo): keys/values [L, H, C, D], slot_pos
[L, H, C] int32, query [L, Hq, D]. `*_reference` are the plain PyTorch versions (CPU, and
the check the Triton kernels are tested against on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvrecall.kernels._triton import next_power_of_2, use_triton
from kvrecall.kernels.pinned_copy import pinned_copy

# Working-set tensors start on 256-byte boundaries (SegmentLayout) of page-aligned memory, and
# the anchors are allocator-aligned: every element offset below is a multiple of this.
OFFSET_ALIGN = 16


@dataclass
class SlotTables:
    """Offset and geometry tables of a batch (all on the batch's device).

    keys / values / query: int64 [B] element offsets of each sequence's tensors from `anchor`
    (a 1-element tensor of the layout dtype); slot_pos: from `anchor_pos` (int32). The kernels
    address slot b's keys as anchor + keys[b]: a tensor argument plus an offset the compiler
    knows is aligned, so loads are vectorised. capacity / window_start / window: int32 [B]
    (capacity 0 = an empty slot). They are rows of two device tensors (`offsets` [4, B],
    `geometry` [3, B]) that set() and clear() write through a host copy (pinned on a GPU)
    and one asynchronous upload each: an element written into a device tensor from the host
    (`table[b] = x`) waits for the stream, about 0.13 ms each behind a busy one (H200,
    64 sequences). With `step_uploads` (Engine host_copies="kernel") writes only change the
    host copies and the step's first kernel, upload(), reads them over PCIe (no copy-engine
    transfer, which could queue behind the daemon's DMAs: kernels/pinned_copy.py). With
    `staged` (the Engine's copy path) writes only mark the tables dirty and `flush()`, called
    before each step, uploads a snapshot of them from one of two pinned staging buffers: the
    host may then write the tables while a step queued earlier has not yet read its own (a
    step launched ahead of the host work, Engine overlap). `tensors` keeps, per slot, the
    (keys, values, slot_pos, query) tensors themselves: the reference path reads them, and
    they stay mapped."""

    offsets: torch.Tensor  # int64 [4, B]: keys, values, slot_pos, query
    geometry: torch.Tensor  # int32 [5, B]: capacity, window_start, window, ring_from, kept_below
    host_offsets: torch.Tensor  # their host copies (the same tensors on a CPU)
    host_geometry: torch.Tensor
    anchor: torch.Tensor
    anchor_pos: torch.Tensor
    tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]
    step_uploads: bool = False
    staged: bool = False
    dirty: bool = False
    staging: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @staticmethod
    def empty(batch: int, device: torch.device, dtype: torch.dtype) -> SlotTables:
        offsets = torch.zeros(4, batch, dtype=torch.int64, device=device)
        geometry = torch.zeros(GEOMETRY_ROWS, batch, dtype=torch.int32, device=device)
        if offsets.is_cuda:
            host_offsets, host_geometry = (torch.zeros(t.shape, dtype=t.dtype, pin_memory=True) for t in (offsets, geometry))
        else:
            host_offsets, host_geometry = offsets, geometry
        return SlotTables(
            offsets, geometry, host_offsets, host_geometry,
            torch.zeros(1, dtype=dtype, device=device), torch.zeros(1, dtype=torch.int32, device=device),
            [None] * batch,
        )  # fmt: skip

    @property
    def keys(self) -> torch.Tensor:
        return self.offsets[0]

    @property
    def values(self) -> torch.Tensor:
        return self.offsets[1]

    @property
    def slot_pos(self) -> torch.Tensor:
        return self.offsets[2]

    @property
    def query(self) -> torch.Tensor:
        return self.offsets[3]

    @property
    def capacity(self) -> torch.Tensor:
        return self.geometry[0]

    @property
    def window_start(self) -> torch.Tensor:
        return self.geometry[1]

    @property
    def window(self) -> torch.Tensor:
        return self.geometry[2]

    @property
    def ring_from(self) -> torch.Tensor:
        return self.geometry[3]

    @property
    def kept_below(self) -> torch.Tensor:
        return self.geometry[4]

    def _offset(self, tensor: torch.Tensor, anchor: torch.Tensor) -> int:
        if tensor.dtype != anchor.dtype or tensor.device != anchor.device:
            raise ValueError(f"working-set tensor of {tensor.dtype} on {tensor.device}, batch of {anchor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError("working-set tensors must be contiguous")
        distance = tensor.data_ptr() - anchor.data_ptr()
        offset, rest = divmod(distance, tensor.element_size())
        if rest or offset % OFFSET_ALIGN:
            raise ValueError(f"working-set tensor at {tensor.data_ptr():#x} is not {OFFSET_ALIGN}-element aligned")
        return offset

    def set(
        self, b: int, keys: torch.Tensor, values: torch.Tensor, slot_pos: torch.Tensor, query: torch.Tensor,
        window_start: int, window: int, evicted: int | None = None,
    ) -> None:  # fmt: skip
        """Slot b reads this working set (keys [L, H, C, D], slot_pos [L, H, C], query [L, Hq, D]);
        `evicted`: its evicted boundary under deferred eviction (None: not deferred)."""
        pairs = ((keys, self.anchor), (values, self.anchor), (slot_pos, self.anchor_pos), (query, self.anchor))
        offsets = [self._offset(tensor, anchor) for tensor, anchor in pairs]
        self._write(b, offsets, [keys.shape[2], window_start, window, *_mask(evicted)])
        self.tensors[b] = (keys, values, slot_pos, query)

    def set_evicted(self, b: int, evicted: int | None) -> None:
        """Slot b's evicted boundary changed (deferred eviction: an answer was taken)."""
        self.host_geometry.numpy()[3:, b] = _mask(evicted)
        self._publish()

    def clear(self, b: int) -> None:
        self._write(b, [0, 0, 0, 0], [0, 0, 0, *_mask(None)])
        self.tensors[b] = None

    def _write(self, b: int, offsets: list[int], geometry: list[int]) -> None:
        """Column b of both tables, through the host copies. An upload queued earlier and not
        yet run reads the newer values too, which the last upload writes anyway; the tables'
        readers (the step) are queued after it."""
        # (through numpy views: no tensor made per write)
        self.host_offsets.numpy()[:, b] = offsets
        self.host_geometry.numpy()[:, b] = geometry
        self._publish()

    def _publish(self) -> None:
        """After a write of the host copies: upload them now, or mark them for flush()."""
        if self.host_offsets is self.offsets or self.step_uploads:
            return
        if self.staged:
            self.dirty = True
            return
        self.offsets.copy_(self.host_offsets, non_blocking=True)
        self.geometry.copy_(self.host_geometry, non_blocking=True)

    def flush(self, parity: int = 0) -> None:
        """`staged`: upload the tables written since the last flush (nothing if none), through
        staging buffer `parity` (0 or 1). Its previous upload must have run: the caller
        alternates parities and has waited for the step two flushes back (or syncs every step)."""
        if not self.dirty:
            return
        self.dirty = False
        if not self.staging:
            self.staging = [tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in
                                  (self.host_offsets, self.host_geometry)) for _ in range(2)]  # fmt: skip
        offsets, geometry = self.staging[parity]
        offsets.copy_(self.host_offsets)
        geometry.copy_(self.host_geometry)
        self.offsets.copy_(offsets, non_blocking=True)
        self.geometry.copy_(geometry, non_blocking=True)

    def upload(self, impl: str = "auto") -> None:
        """The host copies into the device tables by a kernel (step_uploads: the step's first
        launch; the host writes them only between steps)."""
        if self.host_offsets is not self.offsets:
            pinned_copy(self.host_offsets, self.offsets, impl)
            pinned_copy(self.host_geometry, self.geometry, impl)


def ring_spans(first: int, window: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ring slots (`window` of them from slot `first`; position p in first + p % window) of
    positions [start, end), at most `window` of them, as slot ranges: one, or two where the
    range wraps."""
    if end <= start:
        return []
    lo = first + start % window
    hi = lo + (end - start)
    if hi <= first + window:
        return [(lo, hi)]
    return [(lo, first + window), (first, hi - window)]


GEOMETRY_ROWS = 5
INT32_MAX = 2**31 - 1


def _mask(evicted: int | None) -> list[int]:
    """ring_from, kept_below for an evicted boundary (None: every filled slot is read)."""
    return [0, INT32_MAX] if evicted is None else [evicted, evicted]


def readable(slot_pos: torch.Tensor, window_start: int, ring_from: int, kept_below: int) -> torch.Tensor:
    """Which slots of slot_pos [..., C] attention reads (see the module docstring)."""
    ring = torch.arange(slot_pos.shape[-1], device=slot_pos.device) >= window_start
    return (slot_pos >= 0) & torch.where(ring, slot_pos >= ring_from, slot_pos < kept_below)


# ---- references ---------------------------------------------------------------------------
def write_step_reference(
    tables: SlotTables, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, positions: torch.Tensor
) -> None:
    """k, v [B, H, D]; q [B, Hq, D]; positions int64 [B] (the new token's position)."""
    for b, views in enumerate(tables.tensors):
        if views is None:
            continue
        keys, values, slot_pos, query = views
        pos = int(positions[b])
        slot = int(tables.window_start[b]) + pos % int(tables.window[b])
        keys[layer, :, slot] = k[b]
        values[layer, :, slot] = v[b]
        slot_pos[layer, :, slot] = pos
        query[layer] = q[b]


def attend_reference(tables: SlotTables, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D] -> [B, Hq, D]: softmax attention over each sequence's valid slots of
    `layer` (an empty batch slot, or one with no valid slot, gives zeros)."""
    out = torch.zeros_like(q)
    for b, views in enumerate(tables.tensors):
        if views is None:
            continue
        keys, values, slot_pos, _ = views
        H, C, D = keys.shape[1:]
        G = q.shape[1] // H
        qb = q[b].view(H, G, D).float()
        scores = torch.einsum("hgd,hcd->hgc", qb, keys[layer].float()) * scale
        geometry = [int(g) for g in tables.host_geometry[1:, b]]
        valid = readable(slot_pos[layer], geometry[0], geometry[2], geometry[3])[:, None, :]
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[b] = torch.einsum("hgc,hcd->hgd", weights, values[layer].float()).reshape(-1, D).to(q.dtype)
    return out


def write_step(
    tables: SlotTables, layer: int, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, positions: torch.Tensor,
    impl: str = "auto",
) -> None:  # fmt: skip
    """Write one layer's new K/V and query for every sequence (see the module docstring)."""
    if not use_triton(impl, k.device):
        write_step_reference(tables, layer, k, v, q, positions)
        return
    from kvrecall.kernels.ws_decode_triton import write_step_triton

    write_step_triton(tables, layer, k, v, q, positions)


class AttendWorkspace:
    """The split partials of `attend` for one batch shape, allocated once (graph-safe).

    The slots of a sequence are cut into `splits` ranges of `slots_per_split` so that about
    `target_programs` programs share the work at any batch size (flash-decoding)."""

    def __init__(
        self, batch: int, kv_heads: int, group: int, head_dim: int, max_capacity: int, device: torch.device,
        block_c: int = 64, target_programs: int | None = None,
    ) -> None:  # fmt: skip
        if target_programs is None:  # enough to fill the GPU several times over; 256 elsewhere
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
            target_programs = 16 * sms
        self.kv_heads = kv_heads
        self.group_padded = max(16, next_power_of_2(group))
        self.block_c = block_c
        blocks = max(1, math.ceil(max_capacity / block_c))
        want = max(1, target_programs // max(1, batch * kv_heads))
        self.splits = max(1, min(blocks, want, 64))
        self.slots_per_split = math.ceil(blocks / self.splits) * block_c
        shape = (batch, kv_heads, self.splits, self.group_padded)
        self.acc = torch.empty((*shape, head_dim), dtype=torch.float32, device=device)
        self.m = torch.empty(shape, dtype=torch.float32, device=device)
        self.l = torch.empty(shape, dtype=torch.float32, device=device)


def attend(
    tables: SlotTables, layer: int, q: torch.Tensor, scale: float, workspace: AttendWorkspace | None = None,
    impl: str = "auto",
) -> torch.Tensor:  # fmt: skip
    """Decode attention: q [B, Hq, D] over every sequence's valid slots of `layer` -> [B, Hq, D].
    `workspace` (for the Triton kernel) is made here when not given (not graph-safe then)."""
    if not use_triton(impl, q.device):
        return attend_reference(tables, layer, q, scale)
    from kvrecall.kernels.ws_decode_triton import attend_triton

    if workspace is None:
        kv_heads = next(t[0].shape[1] for t in tables.tensors if t is not None)
        capacity = max(t[0].shape[2] for t in tables.tensors if t is not None)
        workspace = AttendWorkspace(q.shape[0], kv_heads, q.shape[1] // kv_heads, q.shape[2], capacity, q.device)
    return attend_triton(tables, layer, q, scale, workspace)
