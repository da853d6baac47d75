"""WorkingSet: the daemon's view of one session's [sinks | retrieved | window] tensors.

The memory is a DeviceSegment the worker maps too (docs/ARCHITECTURE.md). The daemon
writes it only while the worker waits for an answer, so no locking is needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall import kernels
from kvrecall.server.host_store import SequenceStore
from kvrecall.server.layout import ModelLayout, SegmentLayout, WorkingSetPlan
from kvrecall.server.pools import DeviceSegment


@dataclass
class Placement:
    """What one retrieval did to the retrieved region (summed over layers and heads)."""

    placed: int = 0     # retrieved slots filled afterwards
    gathered: int = 0   # rows moved from the host tier now
    bytes_moved: int = 0


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
        self.slot_pos.fill_(-1)
        self.max_resident = 0

    # ---- slots -------------------------------------------------------------------------
    def window_slots(self, start: int, end: int) -> torch.Tensor:
        """Ring slots of tokens [start, end), int64 [n]."""
        positions = torch.arange(start, end, dtype=torch.int64)
        return self.plan.window_start + positions % self.plan.window

    def write_tokens(self, kv: torch.Tensor, token_offset: int, start: int, end: int, slots: torch.Tensor) -> None:
        """Copy tokens [start, end) of kv [L, 2, H, n, D] (token 0 = position token_offset)
        into `slots` of every layer and head, and record their positions."""
        if end <= start:
            return
        src = kv[:, :, :, start - token_offset : end - token_offset].to(self.keys.device)
        self.keys[:, :, slots] = src[:, 0]
        self.values[:, :, slots] = src[:, 1]
        positions = torch.arange(start, end, dtype=torch.int32, device=self.slot_pos.device)
        self.slot_pos[:, :, slots] = positions
        self._note_resident()

    def read_window(self, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) from the ring as [L, 2, H, n, D] (for spilling to host)."""
        slots = self.window_slots(start, end).to(self.keys.device)
        return torch.stack((self.keys[:, :, slots], self.values[:, :, slots]), dim=1)

    def clear_window(self, start: int, end: int) -> None:
        """Empty the ring slots of tokens [start, end)."""
        if end > start:
            self.slot_pos[:, :, self.window_slots(start, end).to(self.slot_pos.device)] = -1

    # ---- retrieved region --------------------------------------------------------------
    def retrieved_positions(self) -> torch.Tensor:
        """Current retrieved-region positions, int64 [L, H, R] (-1 = empty)."""
        s, r = self.plan.n_sink, self.plan.retrieved
        return self.slot_pos[:, :, s : s + r].to(torch.int64)

    def set_retrieved(self, store: SequenceStore, selection: torch.Tensor) -> Placement:
        """Make the retrieved region hold exactly `selection` (int64 [L, H, R], -1 padded).

        Tokens already resident stay in their slots; only the rest are gathered from the
        host tier into slots that fell free.
        """
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        R, S = self.plan.retrieved, self.plan.n_sink
        device = self.slot_pos.device
        selection = selection.to(device=device, dtype=torch.int64)
        current = self.retrieved_positions()
        if selection.shape != (L, H, R):
            raise ValueError(f"selection shape {tuple(selection.shape)} != {(L, H, R)}")
        span = self.layout.max_tokens + 1
        row = torch.arange(L * H, dtype=torch.int64, device=device).view(L, H, 1)
        cur_valid, sel_valid = current >= 0, selection >= 0
        cur_key = torch.where(cur_valid, row * span + current, -1)
        sel_key = torch.where(sel_valid, row * span + selection, -2)
        keep = cur_valid & torch.isin(cur_key, sel_key)
        new = sel_valid & ~torch.isin(sel_key, cur_key)
        free = ~keep
        # k-th new token of a row goes to the k-th free slot of that row.
        free_rank = torch.cumsum(free.view(L * H, R), dim=1) - 1
        table = torch.full((L * H, R), -1, dtype=torch.int64, device=device)
        free_rows, free_cols = free.view(L * H, R).nonzero(as_tuple=True)
        table[free_rows, free_rank[free_rows, free_cols]] = free_cols
        new_rank = torch.cumsum(new.view(L * H, R), dim=1) - 1
        new_rows, new_cols = new.view(L * H, R).nonzero(as_tuple=True)
        target = table[new_rows, new_rank[new_rows, new_cols]]
        positions = selection.view(L * H, R)[new_rows, new_cols]
        # Empty every slot that is not kept, then fill the targets.
        d = (free & cur_valid).nonzero(as_tuple=True)
        self.slot_pos[d[0], d[1], S + d[2]] = -1
        moved = self.gather(store, new_rows // H, new_rows % H, S + target, positions)
        self._note_resident()
        return Placement(placed=int(sel_valid.sum()), gathered=int(positions.numel()), bytes_moved=moved)

    def gather(
        self,
        store: SequenceStore,
        layer: torch.Tensor,
        head: torch.Tensor,
        slot: torch.Tensor,
        position: torch.Tensor,
    ) -> int:
        """Copy K and V rows of (layer, head, position) from the host tier into `slot`
        (index tensors on the working set's device). Returns the bytes moved."""
        n = int(position.numel())
        if n == 0:
            return 0
        H, C, D = self.layout.num_kv_heads, self.plan.capacity, self.layout.head_dim
        dst = ((layer * H + head) * C + slot) * D
        for kv_index, target in ((0, self.keys), (1, self.values)):
            src = store.row_offsets(layer, kv_index, head, position)
            kernels.gather_rows(store.flat, src, target.view(-1), dst, D)
        self.slot_pos[layer, head, slot] = position.to(torch.int32)
        return 2 * n * D * self.keys.element_size()

    # ---- accounting --------------------------------------------------------------------
    def resident_tokens(self) -> int:
        """Most filled slots of any (layer, head)."""
        return int((self.slot_pos >= 0).sum(dim=-1).max())

    def _note_resident(self) -> None:
        self.max_resident = max(self.max_resident, self.resident_tokens())
