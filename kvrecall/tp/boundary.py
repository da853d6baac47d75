"""AgreedBoundaryDetector: one boundary decision per step for the whole tensor-parallel model.

Each rank sees only its own query heads, so its local signal differs from the single-GPU one
and ranks deciding alone would diverge (one retrieves, the other does not; their working sets
then hold different tokens for the same step). Here each rank computes, per layer, the sum
of its heads' cosine similarities and how many heads it has; the ranks exchange those
[L, 2] tables (one all-gather per step) and every rank adds them up in rank order. The
per-layer mean is then exactly the single-GPU signal over all heads (a sum over heads
divided by their count), and since every rank runs the same additions on the same numbers,
all ranks hold bit-identical similarities and take the same decision. Aggregation over layers
and the threshold test are BoundaryDetector's own (kvrecall/client/boundary.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.tp.group import TPGroup
from kvrecall.v1 import kvrecall_pb2 as pb


@dataclass
class AgreedBoundaryDetector(BoundaryDetector):
    group: TPGroup = field(default_factory=TPGroup.single)
    local: torch.Tensor | None = field(default=None, repr=False)  # [L, 2] float64: sum, heads
    pending: bool = False  # observed since the last agreement
    agreements: int = 0  # collectives run (one per decided step)

    @staticmethod
    def replacing(detector: BoundaryDetector, group: TPGroup) -> AgreedBoundaryDetector:
        """The agreeing twin of `detector` (same rule, threshold, layers and aggregation)."""
        return AgreedBoundaryDetector(
            detector.mode, detector.threshold, detector.num_layers, detector.aggregate, detector.target_rate,
            detector.min_gap, group=group,
        )

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Record this step's local query [Hq_local, D] for `layer` (no device sync)."""
        if self.local is None or self.local.device != query.device:
            self.local = torch.zeros(self.num_layers, 2, dtype=torch.float64, device=query.device)
        heads = query.shape[0]
        sim = self.head_similarity(layer, query)
        if sim is None:
            self.local[layer, 0] = -float(heads)  # the single-GPU detector's -1 per layer
        else:
            self.local[layer, 0] = sim.double().sum()
        self.local[layer, 1] = heads
        self.pending = True

    def agree(self) -> None:
        """Exchange the local tables and set `similarity` to the all-heads per-layer means."""
        if not self.pending:
            return
        total = self.group.gather(self.local).sum(dim=0)  # [L, 2], same additions on every rank
        self.similarity = (total[:, 0] / total[:, 1]).tolist()
        self.pending = False
        self.agreements += 1

    def score(self) -> float:
        self.agree()
        return super().score()

    def is_boundary(self) -> bool:
        if self.mode == pb.BOUNDARY_MODE_THRESHOLD:
            self.agree()
        return super().is_boundary()
