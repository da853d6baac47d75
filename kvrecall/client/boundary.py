"""BoundaryDetector: the worker-side semantic-boundary test of LouisKV (arXiv 2510.11292).

Critical KVs barely change inside a semantic segment, so retrieval is triggered only when
the current query drifts from the query that triggered the last retrieval. Per layer the
signal is the cosine similarity of the two queries, averaged over query heads; layers are
aggregated by `aggregate` ("mean" by default, chosen by measurement: docs/TUNING.md). No RPC
is involved: the detector reads the queries the attention already computed. The cosine is
`kvrecall.kernels.cosine_similarity` (the Triton kernel on CUDA queries, else the reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrecall import kernels
from kvrecall.v1 import kvrecall_pb2 as pb


@dataclass
class BoundaryDetector:
    mode: int                 # pb.BoundaryMode
    threshold: float
    num_layers: int
    aggregate: str = "mean"   # "mean" | "min" over layers
    reference: list[torch.Tensor | None] = field(default_factory=list)  # per layer [Hq, D]
    similarity: list[float] = field(default_factory=list)               # per layer, this step

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "min"):
            raise ValueError("aggregate must be 'mean' or 'min'")
        self.reference = [None] * self.num_layers
        self.similarity = [1.0] * self.num_layers

    def set_reference(self, layer: int, query: torch.Tensor) -> None:
        """query: [Hq, D], the query a retrieval was made for."""
        self.reference[layer] = query.detach().float().clone()

    def head_similarity(self, layer: int, query: torch.Tensor) -> torch.Tensor | None:
        """Cosine of each head of `query` [Hq, D] with the layer's reference -> [Hq] f32 (None: no reference)."""
        ref = self.reference[layer]
        if ref is None:
            return None
        return kernels.cosine_similarity(query.detach()[None], ref[None])[0]

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Record this step's query [Hq, D] for `layer`."""
        sim = self.head_similarity(layer, query)
        self.similarity[layer] = -1.0 if sim is None else float(sim.mean())

    def score(self) -> float:
        if self.aggregate == "min":
            return min(self.similarity)
        return sum(self.similarity) / len(self.similarity)

    def is_boundary(self) -> bool:
        if self.mode == pb.BOUNDARY_MODE_EVERY_STEP:
            return True
        if self.mode == pb.BOUNDARY_MODE_THRESHOLD:
            return self.score() < self.threshold
        return False
