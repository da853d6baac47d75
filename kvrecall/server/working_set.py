"""WorkingSet: the daemon's view of one session's [sinks | retrieved | window] tensors.

The memory is a DeviceSegment the worker maps too (docs/ARCHITECTURE.md). The daemon
writes it only while the worker waits for an answer, so no locking is needed here.
Nothing on the decode path (spill, evict, place) waits for the GPU: index tensors are made
on the device, counts stay there until read, and ring ranges are plain slices.
"""

from __future__ import annotations

import torch

from kvrecall import kernels
from kvrecall.kernels.placement_staged import Staging
from kvrecall.kernels.ws_decode import ring_spans
from kvrecall.server.host_store import SequenceStore
from kvrecall.server.layout import ModelLayout, SegmentLayout, WorkingSetPlan, staging_rows, table_shapes
from kvrecall.server.pools import DeviceSegment


class Placement:
    """What one retrieval did to the retrieved region (summed over layers and heads).

    The counts are computed on the working set's device and copied to host memory without a
    sync; the first read waits for that copy (after Session.finish() it waits for nothing).
    """

    def __init__(self, counts: torch.Tensor | None = None, row_bytes: int = 0) -> None:
        """counts: int64 [4] (slots filled, rows gathered, units chosen, slots filled in the
        fullest row; [4 S] for many()); row_bytes: one K row."""
        self.row_bytes = row_bytes
        self._values: list[int] | None = [0, 0, 0, 0] if counts is None else None
        self._ready: torch.cuda.Event | None = None
        if counts is not None and counts.is_cuda:
            self._host = torch.empty(counts.numel(), dtype=torch.int64, pin_memory=True)
            self._host.copy_(counts, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(counts.device))
        elif counts is not None:
            self._host = counts

    @classmethod
    def many(cls, counts: torch.Tensor, row_bytes: int) -> list[Placement]:
        """One Placement per row of counts int64 [S, 4], sharing one copy to host memory."""
        whole = cls(counts.reshape(-1), row_bytes)
        placements = []
        for row in whole._host.view(-1, 4):
            placement = cls(None, row_bytes)
            placement._values, placement._host, placement._ready = None, row, whole._ready
            placements.append(placement)
        return placements

    def _read(self) -> list[int]:
        if self._values is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._values = self._host.tolist()
        return self._values

    @property
    def placed(self) -> int:
        """Retrieved slots filled afterwards."""
        return self._read()[0]

    @property
    def gathered(self) -> int:
        """Rows moved from the host tier now (K and V count once)."""
        return self._read()[1]

    @property
    def units(self) -> int:
        """Retrieval units the selection came from (policy-defined)."""
        return self._read()[2]

    @property
    def most_filled(self) -> int:
        """Retrieved slots filled afterwards in the fullest (layer, head) row."""
        return self._read()[3]

    @property
    def bytes_moved(self) -> int:
        return 2 * self.gathered * self.row_bytes


class WorkingSet:
    def __init__(self, segment: DeviceSegment, layout: ModelLayout, plan: WorkingSetPlan) -> None:
        self.segment = segment
        self.layout = layout
        self.plan = plan
        self.offsets = SegmentLayout.of(layout, plan)
        L, H, Hq, C, D = (
            layout.num_layers,
            layout.num_kv_heads,
            layout.num_query_heads,
            plan.capacity,
            layout.head_dim,
        )
        raw = segment.tensor
        o = self.offsets

        def view(offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            return raw[offset : offset + nbytes].view(dtype).view(shape)

        self.keys = view(o.keys_offset, layout.dtype, (L, H, C, D))
        self.values = view(o.values_offset, layout.dtype, (L, H, C, D))
        self.slot_pos = view(o.slot_pos_offset, torch.int32, (L, H, C))
        self.query = view(o.query_offset, layout.dtype, (L, Hq, D))
        # With a staging area (plan.staged): where background retrievals leave rows for the worker.
        self.staging: Staging | None = None
        if (S := staging_rows(layout, plan)) > 0:
            self.staging = Staging(
                view(o.staged_keys_offset, layout.dtype, (S, D)), view(o.staged_values_offset, layout.dtype, (S, D)),
                view(o.staged_targets_offset, torch.int64, (S,)),
            )  # fmt: skip
        # With a mapped unit table (plan.table, the daemon's worker_selection): its fields, which
        # louiskv's table and pinned tokens live in, and where the worker writes its choice.
        self.table_fields: dict[str, torch.Tensor] = {}
        for (name, offset), (shape, dtype) in zip(o.table_offsets, table_shapes(layout, plan).values(), strict=True):
            field = view(offset, dtype, shape)
            field.fill_(-1 if name in ("pinned", "chosen") else 0)
            self.table_fields[name] = field
        # Whether a worker-copies retrieval stages every new row (set by the session, which knows
        # the pool: note_staging): then it writes no key or value row in place.
        self.stages_every_row = False
        self.slot_pos.fill_(-1)
        self._max_resident = torch.zeros((), dtype=torch.int64, device=self.slot_pos.device)
        self.last_placement: Placement | None = None
        self._part: tuple[torch.Tensor, ...] | None = None  # kernel_part's, for the store it was made for

    def note_staging(self, store: SequenceStore) -> None:
        """Whether this set's staging area (if any) takes every new row of a retrieval: it holds
        a whole retrieved region and every placement from `store`'s pool can be staged."""
        self.stages_every_row = (
            self.staging is not None and self.staging.capacity >= self.rows * self.plan.retrieved
            and (not self.keys.is_cuda or kernels.always_staged(self.keys, store.flat, self.plan.retrieved))
        )  # fmt: skip  (on a CPU the reference stages whenever the rows fit: kernels.place_retrieved)

    @property
    def rows(self) -> int:
        """(layer, KV head) rows: L * H."""
        return self.layout.num_layers * self.layout.num_kv_heads

    # ---- slots -------------------------------------------------------------------------
    def window_slots(self, start: int, end: int) -> torch.Tensor:
        """Ring slots of tokens [start, end), int64 [n] on the working set's device."""
        positions = torch.arange(start, end, dtype=torch.int64, device=self.slot_pos.device)
        return self.plan.window_start + positions % self.plan.window

    def ring_spans(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ring slots of tokens [start, end) (at most `window` of them) as slot ranges:
        one, or two where the range wraps."""
        return ring_spans(self.plan.window_start, self.plan.window, start, end)

    def write_tokens(
        self, kv: torch.Tensor, token_offset: int, start: int, end: int, slots: torch.Tensor,
        layers: slice = slice(None),
    ) -> None:
        """Copy tokens [start, end) of kv [l, 2, H, n, D] (token 0 = position token_offset)
        into `slots` of `layers` (all: l = L) and every head, and record their positions."""
        if end <= start:
            return
        src = kv[:, :, :, start - token_offset : end - token_offset].to(self.keys.device)
        self.keys[layers, :, slots] = src[:, 0]
        self.values[layers, :, slots] = src[:, 1]
        positions = torch.arange(start, end, dtype=torch.int32, device=self.slot_pos.device)
        self.slot_pos[layers, :, slots] = positions

    def spill(self, store: SequenceStore, start: int, end: int) -> None:
        """Copy tokens [start, end) from the ring to the host tier (the GPU writes the pinned
        pages itself: no D2H sync)."""
        L, H, C, D = self.keys.shape
        kernels.spill_ring(
            self.keys.view(L * H, C, D), self.values.view(L * H, C, D), start, end, self.plan.window_start,
            self.plan.window, store.flat, store.page_table, store.tokens_per_page, H,
        )  # fmt: skip
        store.num_tokens = max(store.num_tokens, end)

    def clear_window(self, start: int, end: int) -> None:
        """Empty the ring slots of tokens [start, end)."""
        for lo, hi in self.ring_spans(start, end):
            self.slot_pos[:, :, lo:hi] = -1

    # ---- retrieved region --------------------------------------------------------------
    def retrieved_positions(self) -> torch.Tensor:
        """Current retrieved-region positions, int64 [L, H, R] (-1 = empty)."""
        s, r = self.plan.n_sink, self.plan.retrieved
        return self.slot_pos[:, :, s : s + r].to(torch.int64)

    def retrieved_row_full(self) -> bool:
        """Whether some row's retrieved slots are all filled since the last placement (only
        set_retrieved writes the region), so a placement that fills every row alike
        (fill_free_slots) has no room. Reads that placement's counts: free after finish().
        (A retrieval under budget usually leaves a few slots free in most rows but fills
        some row: "every row full" was almost never true, and every AppendNotice paid
        for an empty fill, 0.5 ms of host time on an H200.)"""
        last = self.last_placement
        return last is not None and last.most_filled >= self.plan.retrieved

    def set_retrieved(
        self, store: SequenceStore, selection: torch.Tensor, units: int | torch.Tensor = 0
    ) -> Placement:
        """Make the retrieved region hold exactly `selection` (int [L, H, R], -1 padded).

        Tokens already resident stay in their slots; only the rest are gathered from the
        host tier into slots that fell free (kernels.place_retrieved: one launch, no sync,
        max_resident noted on the way). `units` (an int or a device scalar) rides along in the
        Placement's counts.
        """
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        R, S, C, D = self.plan.retrieved, self.plan.n_sink, self.plan.capacity, self.layout.head_dim
        if selection.shape != (L, H, R):
            raise ValueError(f"selection shape {tuple(selection.shape)} != {(L, H, R)}")
        device = self.slot_pos.device
        units = to_device(units, device).reshape(1) if isinstance(units, torch.Tensor) else units
        placed: list[Placement] = []

        def account(counts: torch.Tensor) -> None:  # (before a staged placement's sync: kernels.place_retrieved)
            totals = torch.empty(4, dtype=torch.int64, device=device)
            torch.sum(counts, dim=0, out=totals[:2])
            if isinstance(units, torch.Tensor):
                totals[2:3].copy_(units)
            else:
                totals[2] = units
            totals[3] = counts[:, 0].amax()
            placed.append(Placement(totals, row_bytes=D * self.keys.element_size()))

        kernels.place_retrieved(
            self.slot_pos.view(L * H, C), self.keys.view(L * H, C, D), self.values.view(L * H, C, D),
            to_device(selection, device).reshape(L * H, R), S, store.flat, store.page_table,
            store.tokens_per_page, H, resident_max=self._max_resident, on_counts=account,
        )  # fmt: skip
        self.last_placement = placed[0]
        return self.last_placement

    @staticmethod
    def set_retrieved_together(
        sets: list[WorkingSet], stores: list[SequenceStore], selections: list[torch.Tensor],
        units: list[int | torch.Tensor],
    ) -> list[Placement] | None:
        """set_retrieved for several sessions of one layout and plan whose host pages share one
        pool, in one placement launch (kernels.place_retrieved_many) and one copy of the counts;
        units: ints or device scalars, as set_retrieved's. None where they differ (the caller
        places them one by one)."""
        first, pool = sets[0], stores[0].flat
        if any(ws.layout != first.layout or ws.plan != first.plan for ws in sets) or any(
            store.flat.data_ptr() != pool.data_ptr() or store.tokens_per_page != stores[0].tokens_per_page
            for store in stores
        ):
            return None
        L, H = first.layout.num_layers, first.layout.num_kv_heads
        R, S, D = first.plan.retrieved, first.plan.n_sink, first.layout.head_dim
        device = first.slot_pos.device
        parts = [ws.kernel_part(store) for ws, store in zip(sets, stores, strict=True)]
        selection = torch.cat([to_device(chosen, device).reshape(L * H, R) for chosen in selections])
        units = [
            to_device(u, device) if isinstance(u, torch.Tensor) else torch.full((), u, dtype=torch.int64, device=device)
            for u in units
        ]  # fmt: skip
        placed: list[list[Placement]] = []

        def account(counts: torch.Tensor) -> None:  # (before a staged placement's sync: kernels.place_retrieved)
            totals = torch.empty(len(sets), 4, dtype=torch.int64, device=device)
            per_row = counts.view(len(sets), L * H, 2)
            torch.sum(per_row, dim=1, out=totals[:, :2])
            totals[:, 2] = torch.stack(units)
            totals[:, 3] = per_row[:, :, 0].amax(dim=1)
            placed.append(Placement.many(totals, row_bytes=D * first.keys.element_size()))

        kernels.place_retrieved_many(parts, selection, S, pool, stores[0].tokens_per_page, H, on_counts=account)
        placements = placed[0]
        for ws, placement in zip(sets, placements, strict=True):
            ws.last_placement = placement
        return placements

    @staticmethod
    def spill_evict_together(
        sets: list[WorkingSet], stores: list[SequenceStore], spills: list[tuple[int, int]],
        evictions: list[tuple[int, int]], sums: bool,
    ) -> torch.Tensor | None:  # fmt: skip
        """Several sessions' AppendNotices in one launch (kernels.spill_evict_many): each spills
        its tokens spills[s] to its host tier, empties the ring slots of evictions[s] (not under
        deferred eviction: the worker masks them) and notes max_resident. With `sums`, returns the keys that left, summed per row (float32
        [S, L * H, D]). Sessions of one layout and plan whose host pages share one pool."""
        first = sets[0]
        L, H, D = first.layout.num_layers, first.layout.num_kv_heads, first.layout.head_dim
        parts = [ws.kernel_part(store) for ws, store in zip(sets, stores, strict=True)]
        out = torch.empty(len(sets), L * H, D, dtype=torch.float32, device=first.keys.device) if sums else None
        kernels.spill_evict_many(
            parts, spills, evictions, first.plan.window_start, first.plan.window, stores[0].flat,
            stores[0].tokens_per_page, H, sums=out, clear=not first.plan.deferred,
        )  # fmt: skip
        for store, (_, end) in zip(stores, spills, strict=True):
            store.num_tokens = max(store.num_tokens, end)
        return out

    def kernel_part(self, store: SequenceStore) -> tuple[torch.Tensor, ...]:
        """This session's part of a launch over many (placement and notice kernels): slot_pos
        [B, C], keys / values [B, C, D] (B = layers x KV heads), its page table in `store`'s
        pool, its resident counter. Made once per store (its tensors never change; a Boundaries call
        at 64 sequences asked for ~26 of them: 2 ms of the daemon's thread on an H200)."""
        part = self._part
        if part is None or part[3] is not store.page_table:
            B, C, D = self.rows, self.plan.capacity, self.layout.head_dim
            part = self._part = (self.slot_pos.view(B, C), self.keys.view(B, C, D), self.values.view(B, C, D),
                                 store.page_table, self._max_resident)  # fmt: skip
        return part

    def spill_group_key(self, store: SequenceStore) -> tuple:
        """Sessions with equal keys can spill together (spill_evict_together)."""
        return (self.layout, self.plan, store.flat.data_ptr(), store.tokens_per_page)

    # ---- accounting --------------------------------------------------------------------
    def resident_tokens(self) -> int:
        """Most filled slots of any (layer, head) (a host sync: for answers, not the decode path)."""
        return int((self.slot_pos >= 0).sum(dim=-1).max())

    def note_resident(self) -> None:
        """Fold the current resident count into max_resident, on the device (no sync)."""
        now = (self.slot_pos >= 0).sum(dim=-1).amax()
        torch.maximum(self._max_resident, now, out=self._max_resident)

    @property
    def max_resident(self) -> int:
        """Most resident tokens of any (layer, head) seen at the end of an operation."""
        return int(self._max_resident)

    @property
    def max_resident_counter(self) -> torch.Tensor:
        """max_resident as its int64 [1] tensor on the working set's device (written in place)."""
        return self._max_resident.view(1)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor goes to a GPU through pinned memory, asynchronously
    (a plain .to() from pageable memory waits for the stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
