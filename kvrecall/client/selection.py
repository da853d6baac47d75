"""A louiskv session's unit table as its worker maps it (WorkingSetInfo.selection, the daemon's
`worker_selection`): the worker chooses a boundary's retrieval itself, in its own CUDA context,
and the daemon only places that choice (StepEvent.worker_selected).

Why: a daemon process's retrieval kernels time-slice with the worker's step on the same GPU and
cost it 3-5x their own GPU time (DEVELOPERS.md, "The process daemon's boundary cost"); the same
selection launched by the worker runs beside its step as an embedded daemon's does.

The choice is the daemon's own at a boundary: louiskv closes the open output segment (the tokens
evicted since the last close, their mean key its representative) and chooses over every unit,
every layer (`choose_units_split`, the kernels the daemon runs). The worker reads the table as the
session's last event left it (StepResult.table: the filled columns, the open segment's first
token and the evicted end; the open segment's key sum in the mapped `open_sum`) and takes the
open segment as one more unit without writing the table; the daemon closes it after placing the
choice. What the worker read goes beside the choice (chosen_meta); a daemon whose table does not
hold it chooses itself. A notice riding in the boundary's own event (applied by the daemon before
it would choose) evicts tokens the worker still holds in its ring: their keys join its open
segment as they join the daemon's (summed in another order: the same mean up to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall.transport import MappedTensor, map_segment, open_ref
from kvrecall.v1 import kvrecall_pb2 as pb

FIELDS = ("reps", "sizes", "position", "pinned", "open_sum", "chosen", "chosen_meta")


@dataclass
class WorkerTable:
    reps: torch.Tensor  # [B, U, D]
    sizes: torch.Tensor  # [B, U] int32 (0: no unit)
    position: torch.Tensor  # [B, M] int32, grouped by unit
    pinned: torch.Tensor | None  # [B, P] int64, ascending, -1 padded
    open_sum: torch.Tensor  # [B, D] f32
    chosen: torch.Tensor  # [B, R] int64: written here
    chosen_meta: torch.Tensor  # [4] int64: (units chosen, unit columns read, candidate columns read, open start)
    aggregate: str

    @classmethod
    def mapped(cls, info: pb.MappedSelection, transport: int, segment=None) -> tuple[WorkerTable, list[MappedTensor]]:
        """Map a session's table: views of its shm `segment` (already mapped), or CUDA IPC refs
        -> (the table, the mappings to close with the session's)."""
        names = [name for name in FIELDS if info.HasField(name)]
        refs = [getattr(info, name) for name in names]
        if transport == pb.TRANSPORT_SHM:
            tensors, mapped = map_segment(segment, refs, names), []
        else:
            mapped = [open_ref(ref, f"selection.{name}") for ref, name in zip(refs, names, strict=True)]
            tensors = [m.tensor for m in mapped]
        f = dict(zip(names, tensors, strict=True))
        table = cls(f["reps"], f["sizes"], f["position"], f.get("pinned"), f["open_sum"], f["chosen"], f["chosen_meta"],
                    info.aggregate)  # fmt: skip
        return table, mapped

    def choose(self, query: torch.Tensor, state: pb.MappedTableState,
               evicting: tuple[int, list[torch.Tensor]] | None = None) -> None:  # fmt: skip
        """Every layer's retrieval for `query` [L, Hq, D] (the working set's) over the table as
        `state` names it, into `chosen` and `chosen_meta`, queued on the current stream (no host
        sync). `evicting`: a notice riding in the retrieval's event, which the daemon applies
        first: (the evicted end after it, the keys it evicts from the ring, [L, H, n, D] slices in
        position order), which join the open segment as they do in the daemon."""
        from kvrecall.server.policies.louiskv import choose_units_split, to_reps

        U, M, start, end = state.units, state.candidates, state.open_start, state.evicted
        B, R = self.chosen.shape
        q = query.reshape(B, -1, query.shape[-1])
        sizes = self.sizes[:, :U]
        segments = [(self.reps[:, :U], sizes > 0, sizes, self.position[:, :M])]
        total = self.open_sum if end > start else None  # (the mapped sum of a closed segment is stale)
        if evicting is not None and evicting[0] > end:
            end = evicting[0]
            for keys in evicting[1]:
                part = keys.sum(dim=2, dtype=torch.float32).view(B, -1)
                total = part if total is None else total + part
        n = end - start
        if n > 0 and U < self.sizes.shape[1] and M + n <= self.position.shape[1]:  # the open segment, as closed
            device = self.reps.device
            counts = torch.full((B, 1), n, dtype=torch.int32, device=device)
            # (divided by a tensor as the daemon's close divides: the same rounding as its mean)
            mean = to_reps(total / torch.full((1, 1), float(n), device=device), self.reps.dtype)[:, None]
            span = torch.arange(start, end, dtype=torch.int32, device=device).expand(B, n)
            segments.append((mean, counts > 0, counts, span))
        new, take = choose_units_split(q, segments, self.pinned, R, self.aggregate)
        self.chosen.copy_(new)
        self.chosen_meta[0].copy_((take > 0).sum())
        self.chosen_meta[1].fill_(U)
        self.chosen_meta[2].fill_(M)
        self.chosen_meta[3].fill_(start)
