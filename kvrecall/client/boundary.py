"""BoundaryDetector: the worker-side semantic-boundary test of LouisKV (arXiv 2510.11292).

Critical KVs barely change inside a semantic segment, so retrieval is triggered only when
the current query drifts from the query that triggered the last retrieval. Per layer the
signal is the cosine similarity of the two queries, averaged over query heads; layers are
aggregated by `aggregate` ("mean" by default, chosen by measurement: docs/TUNING.md). No RPC
is involved: the detector reads the queries the attention already computed. The cosine is
`kvrecall.kernels.cosine_similarity` (the Triton kernel on CUDA queries, else the reference).

Two rules decide on that signal (BOUNDARY_MODE_THRESHOLD):

* a fixed threshold (`target_rate` 0): fire when the signal < `threshold`; the threshold was
  tuned on one model and may fire on 0% or 90% of the steps of another;
* a target retrieval rate (`target_rate` r in (0, 1)): the threshold starts at `threshold` and
  after every step moves by `RATE_STEP * (r - fired)` (:func:`next_threshold`): an online
  r-quantile of the session's own signal (stochastic approximation). Summed over T steps the
  moves telescope, so the session's rate is r within |threshold_T - threshold_0| /
  (RATE_STEP * T): it holds r on any model, the signal being bounded (a cosine).

With `min_gap` g > 0 neither rule fires in the first g decode steps after a retrieval (the
prompt's first selection, a chunk's, or a boundary's): a short answer right after a question
does not re-retrieve while its first tokens drift from the question's last query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvrecall import kernels
from kvrecall.v1 import kvrecall_pb2 as pb

RATE_STEP = 0.01
"""How far one step moves a target-rate threshold (similarity units): small enough that one
step's noise barely moves it, large enough to settle within a few hundred steps."""


def next_threshold(threshold, fired, target_rate):
    """The threshold after a step: unchanged where `target_rate` <= 0 (the fixed rule), else
    `threshold + RATE_STEP * (target_rate - fired)`. Floats, or tensors (`fired` as float; the
    batched engine applies it per slot on the device)."""
    return threshold - RATE_STEP * (fired - target_rate) * (target_rate > 0)


@dataclass
class BoundaryDetector:
    mode: int                 # pb.BoundaryMode
    threshold: float
    num_layers: int
    aggregate: str = "mean"   # "mean" | "min" over layers
    target_rate: float = 0.0  # > 0: hold this share of steps retrieving (the threshold adapts)
    min_gap: int = 0          # decode steps after a retrieval in which no boundary fires
    reference: list[torch.Tensor | None] = field(default_factory=list)  # per layer [Hq, D]
    similarity: list[float] = field(default_factory=list)               # per layer, this step

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "min"):
            raise ValueError("aggregate must be 'mean' or 'min'")
        if not 0.0 <= self.target_rate < 1.0:
            raise ValueError("target_rate must be in [0, 1)")
        if self.min_gap < 0:
            raise ValueError("min_gap must be >= 0")
        self.since = 0  # decode steps since the last retrieval
        self.reference = [None] * self.num_layers
        self.similarity = [1.0] * self.num_layers

    def note_retrieval(self) -> None:
        """A retrieval happened outside the rule (a prompt's or a chunk's): min_gap counts from here."""
        self.since = 0

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
            self.since += 1
            fired = self.score() < self.threshold and self.since > self.min_gap
            self.threshold = next_threshold(self.threshold, fired, self.target_rate)
            if fired:
                self.since = 0
            return fired
        return False
