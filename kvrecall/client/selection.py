"""A louiskv session's unit table as its worker maps it (WorkingSetInfo.selection, the daemon's
`worker_selection`): the worker chooses a boundary's retrieval itself, in its own CUDA context,
and the daemon only places that choice from the host (StepEvent.worker_selected).

Why: a daemon process's retrieval kernels time-slice with the worker's step on the same GPU and
cost it 3-5x their own GPU time (DEVELOPERS.md, "The process daemon's boundary cost"); the same
selection launched by the worker runs beside its step as an embedded daemon's does.

The choice is louiskv's own (`choose_units` over every layer, the same kernels the daemon runs)
over the table as the daemon left it when the worker last took a notice's answer: the open
output segment is not a unit yet (the daemon closes it after placing the choice), as with the
daemon's `select_before_close`. The worker reads the first columns its sequence can have filled
(ceil(tokens / unit_min) + 2 units, `tokens` candidates, rounded up to buckets); columns past
the filled ones are units of size 0, never chosen, so reading more changes nothing. It writes
how many it read beside the choice (chosen_meta), and a daemon whose table has more filled
chooses itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrecall.transport import MappedTensor, map_segment, open_ref
from kvrecall.v1 import kvrecall_pb2 as pb

FIELDS = ("reps", "sizes", "position", "pinned", "chosen", "chosen_meta")


@dataclass
class WorkerTable:
    reps: torch.Tensor  # [B, U, D]
    sizes: torch.Tensor  # [B, U] int32 (0: no unit)
    position: torch.Tensor  # [B, M] int32, grouped by unit
    pinned: torch.Tensor | None  # [B, P] int64, ascending, -1 padded
    chosen: torch.Tensor  # [B, R] int64: written here
    chosen_meta: torch.Tensor  # [3] int64: (units chosen, unit columns read, candidate columns read)
    unit_min: int
    unit_bucket: int
    token_bucket: int
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
        fields = dict(zip(names, tensors, strict=True))
        table = cls(
            fields["reps"], fields["sizes"], fields["position"], fields.get("pinned"), fields["chosen"],
            fields["chosen_meta"], info.unit_min, info.unit_bucket, info.token_bucket, info.aggregate,
        )  # fmt: skip
        return table, mapped

    def widths(self, tokens: int) -> tuple[int, int]:
        """(unit, candidate) columns a sequence of `tokens` tokens may have filled, rounded up to
        whole buckets, at most the table's."""
        units = -(-tokens // max(1, self.unit_min)) + 2
        ub, tb = max(1, self.unit_bucket), max(1, self.token_bucket)
        return min(self.sizes.shape[1], -(-units // ub) * ub), min(self.position.shape[1], -(-tokens // tb) * tb)

    def choose(self, query: torch.Tensor, tokens: int) -> None:
        """Every layer's retrieval for `query` [L, Hq, D] (the working set's) into `chosen` and
        `chosen_meta`, queued on the current stream (no host sync)."""
        from kvrecall.server.policies.louiskv import choose_units

        u, m = self.widths(tokens)
        B, R = self.chosen.shape
        q = query.reshape(B, -1, query.shape[-1])
        sizes = self.sizes[:, :u]
        new, take = choose_units(q, self.reps[:, :u], sizes > 0, sizes, self.position[:, :m], self.pinned, R,
                                 self.aggregate)  # fmt: skip
        self.chosen.copy_(new)
        self.chosen_meta[0].copy_((take > 0).sum())
        self.chosen_meta[1].fill_(u)
        self.chosen_meta[2].fill_(m)
