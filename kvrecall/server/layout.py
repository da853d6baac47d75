"""Model layout and working-set plans: the shapes everything else derives from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from kvrecall.dtypes import itemsize

# Alignment of each tensor inside a working-set segment (bytes): keeps vector loads aligned.
_ALIGN = 256


@dataclass(frozen=True)
class ModelLayout:
    """The model whose KV one session holds (validated at the edge, trusted inside)."""

    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    dtype: torch.dtype
    max_tokens: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (GQA)."""
        return self.num_query_heads // self.num_kv_heads

    @property
    def token_bytes(self) -> int:
        """Bytes of K and V for one token over all layers and KV heads."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize(self.dtype)


@dataclass(frozen=True)
class MappedTable:
    """A louiskv unit table held in the working-set segment, so the worker maps it and selects at
    its boundaries itself (the daemon's `worker_selection`; pb.MappedSelection): `units` x
    `tokens` columns per (layer, KV head) row, reps in `rep_dtype`, `pinned` tokens a row (0:
    none), `aggregate` louiskv's."""

    units: int
    tokens: int
    rep_dtype: torch.dtype
    pinned: int
    aggregate: str


@dataclass(frozen=True)
class WorkingSetPlan:
    """Slots per (layer, KV head): [0, n_sink) sinks, then retrieved, then the window ring.

    `spill_every` (A) tokens are appended between AppendNotices; the ring keeps between
    `window - A` and `window` recent tokens (docs/ARCHITECTURE.md). With `slack` S (deferred
    eviction, `with_slack`) the ring has S more slots than it keeps after a notice, so the
    worker writes S tokens past a notice before it needs the answer.
    """

    n_sink: int
    retrieved: int
    window: int
    spill_every: int
    slack: int = 0
    staged: int = 0  # rows per (layer, KV head) a retrieval may stage for the worker to copy (with_staging)
    table: MappedTable | None = None  # a unit table in the segment, for the worker to select over (with_table)

    @property
    def capacity(self) -> int:
        return self.n_sink + self.retrieved + self.window

    @property
    def window_start(self) -> int:
        """First slot of the window ring."""
        return self.n_sink + self.retrieved

    @property
    def min_window(self) -> int:
        """Recent tokens the window always keeps after an eviction."""
        return self.window - self.spill_every - self.slack

    @property
    def deferred(self) -> bool:
        """Deferred eviction: a notice leaves the ring slots it evicts in place (the worker
        masks them) and the worker does not wait for its answer (OpenSessionRequest)."""
        return self.slack > 0

    def with_slack(self) -> WorkingSetPlan:
        """This plan for deferred eviction: spill_every more ring slots, the same min_window."""
        return dataclasses.replace(self, window=self.window + self.spill_every, slack=self.spill_every)

    def with_staging(self, share: float) -> WorkingSetPlan:
        """This plan with a staging area for `share` of the retrieved region (the daemon's
        `worker_copy_share`): a background retrieval whose new rows fit leaves them there and the
        worker copies them into their slots itself (placement_staged.Staging); 0: none."""
        return dataclasses.replace(self, staged=math.ceil(share * self.retrieved) if share > 0 else 0)

    def with_table(self, table: MappedTable) -> WorkingSetPlan:
        """This plan with the policy's unit table in the segment (the daemon's worker_selection)."""
        return dataclasses.replace(self, table=table)


@dataclass(frozen=True)
class SegmentLayout:
    """Byte offsets of the working-set tensors inside one segment: keys, values, slot_pos and
    query, then with a staging area (WorkingSetPlan.staged) its keys and values [S, D] and
    their target rows [S] int64, S = layers x KV heads x staged (offsets 0 without one)."""

    keys_offset: int
    values_offset: int
    slot_pos_offset: int
    query_offset: int
    nbytes: int
    staged_keys_offset: int = 0
    staged_values_offset: int = 0
    staged_targets_offset: int = 0
    table_offsets: tuple[tuple[str, int], ...] = ()  # (field, offset) of table_shapes' fields

    @staticmethod
    def of(layout: ModelLayout, plan: WorkingSetPlan) -> SegmentLayout:
        kv_bytes = (
            layout.num_layers * layout.num_kv_heads * plan.capacity * layout.head_dim * itemsize(layout.dtype)
        )
        pos_bytes = layout.num_layers * layout.num_kv_heads * plan.capacity * 4
        query_bytes = layout.num_layers * layout.num_query_heads * layout.head_dim * itemsize(layout.dtype)
        sizes = [kv_bytes, kv_bytes, pos_bytes, query_bytes]
        staged_rows = staging_rows(layout, plan)
        if staged_rows:
            staged_bytes = staged_rows * layout.head_dim * itemsize(layout.dtype)
            sizes += [staged_bytes, staged_bytes, staged_rows * 8]
        shapes = table_shapes(layout, plan)
        for shape, dtype in shapes.values():
            sizes.append(math.prod(shape) * itemsize(dtype))
        offsets = []
        cursor = 0
        for size in sizes:
            offsets.append(cursor)
            cursor += -(-size // _ALIGN) * _ALIGN
        staged = offsets[4:7] if staged_rows else []
        table = tuple(zip(shapes, offsets[len(offsets) - len(shapes) :], strict=True))
        return SegmentLayout(*offsets[:4], max(cursor, _ALIGN), *staged, table_offsets=table)


def table_shapes(layout: ModelLayout, plan: WorkingSetPlan) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The mapped unit table's fields (plan.table; none without one), B = layers x KV heads rows:
    reps [B, U, D], sizes [B, U] int32, position [B, M] int32, pinned [B, P] int64 (P > 0), the
    open segment's sum [B, D] f32, then what the worker writes: chosen [B, retrieved] int64 and
    chosen_meta [4] int64."""
    table = plan.table
    if table is None:
        return {}
    B, D = layout.num_layers * layout.num_kv_heads, layout.head_dim
    shapes = {
        "reps": ((B, table.units, D), table.rep_dtype),
        "sizes": ((B, table.units), torch.int32),
        "position": ((B, table.tokens), torch.int32),
    }
    if table.pinned:
        shapes["pinned"] = ((B, table.pinned), torch.int64)
    shapes["open_sum"] = ((B, D), torch.float32)
    shapes["chosen"] = ((B, plan.retrieved), torch.int64)
    shapes["chosen_meta"] = ((4,), torch.int64)
    return shapes


def staging_rows(layout: ModelLayout, plan: WorkingSetPlan) -> int:
    """Rows (of head_dim elements) of a segment's staging area: layers x KV heads x plan.staged."""
    return layout.num_layers * layout.num_kv_heads * plan.staged
