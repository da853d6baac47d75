"""`louiskv` — semantic-boundary KV retrieval (LouisKV, ICLR 2026, arXiv 2510.11292).

* Prompt: per (layer, KV head), the keys that left the window at ingest are clustered by
  k-means into units of ~`cluster_size` tokens; a unit's representative is its centroid.
* Output: tokens leaving the window join an open *segment*; a segment closes at a boundary
  (or at `max_segment` tokens) and its representative is the mean of its keys.
* Boundary (the worker saw its query drift below `threshold`): the query [L, Hq, D] scores
  every unit per KV head (grouped query heads aggregated by `aggregate`), the best units fill
  `budget` tokens (the last one partially), and the working set keeps what is already
  resident and gathers the rest from the host tier.
* Between boundaries nothing is retrieved; while the retrieved region has free slots the
  tokens leaving the window fill them (so budget >= sequence length is exact).

Shapes: B = L * H problems; prompt units [B, U, D]; segments [B, Sg, D]; selection [L, H, R].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvrecall import kernels
from kvrecall.server.layout import WorkingSetPlan
from kvrecall.server.policies.base import (
    BoundaryRule,
    Policy,
    PolicyContext,
    Selection,
    check,
    check_resident,
    compact,
    fill_free_slots,
    register,
    resident_plan,
)
from kvrecall.v1 import kvrecall_pb2 as pb


@dataclass
class LouisKVConfig:
    """Defaults chosen by measurement on SmolLM2-135M (docs/TUNING.md)."""

    budget: int = 512        # retrieved tokens per (layer, KV head)
    n_sink: int = 16         # first tokens always resident
    window: int = 64         # recent-window ring slots
    cluster_size: int = 16   # mean prompt tokens per cluster
    kmeans_iters: int = 4    # Lloyd iterations
    threshold: float = 0.85  # boundary when mean query cosine similarity < threshold
    max_segment: int = 64    # an open output segment closes at this many tokens
    aggregate: str = "max"   # grouped query heads: "max" or "sum" of unit scores

    def __post_init__(self) -> None:
        check_resident(self)
        check(1 <= self.cluster_size <= 4096, "cluster_size", "must be in [1, 4096]")
        check(0 <= self.kmeans_iters <= 100, "kmeans_iters", "must be in [0, 100]")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1]")
        check(1 <= self.max_segment <= 1 << 16, "max_segment", "must be in [1, 65536]")
        check(self.aggregate in ("max", "sum"), "aggregate", "must be 'max' or 'sum'")


@dataclass
class _PromptUnits:
    centroids: torch.Tensor  # [B, U, D] float32
    order: torch.Tensor      # [B, N] positions sorted by unit
    unit_of: torch.Tensor    # [B, N] unit of each entry of `order`
    start: torch.Tensor      # [B, U] first index of each unit in `order`
    sizes: torch.Tensor      # [B, U] tokens per unit


@register
class LouisKVPolicy(Policy):
    name = "louiskv"
    proto_field = "louiskv"
    Config = LouisKVConfig

    def __init__(self, config: LouisKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.prompt: _PromptUnits | None = None
        self.seg_reps: list[torch.Tensor] = []  # each [B, D] float32
        self.seg_bounds: list[tuple[int, int]] = []
        self.open_start = 0   # first token of the open output segment
        self.closed_upto = 0  # tokens [prompt_evicted, closed_upto) are in closed segments

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule(pb.BOUNDARY_MODE_THRESHOLD, self.config.threshold)

    def observation(self) -> int:
        return 1

    @property
    def num_units(self) -> int:
        prompt = 0 if self.prompt is None else int((self.prompt.sizes > 0).sum())
        return prompt + len(self.seg_bounds) * self.layout.num_layers * self.layout.num_kv_heads

    # ---- hooks ------------------------------------------------------------------------
    def on_ingest(self, ctx: PolicyContext, queries: torch.Tensor | None) -> Selection | None:
        start, end = min(ctx.ws.plan.n_sink, ctx.prompt_tokens), ctx.evicted_upto
        self.open_start = self.closed_upto = end
        if end > start:
            keys = ctx.prompt_kv[:, 0, :, start:end]  # [L, H, N, D]
            self.prompt = self._cluster(keys.to(ctx.ws.keys.device), start)
        if queries is None:
            return None
        return self._select(ctx, queries[:, :, -1].to(ctx.ws.keys.device), list(range(self.layout.num_layers)))

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        if end - self.open_start >= self.config.max_segment:
            self._close_segment(ctx, end)
        return fill_free_slots(ctx, start, end)

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        self._close_segment(ctx, ctx.evicted_upto)
        return self._select(ctx, query.to(ctx.ws.keys.device), layers)

    # ---- units --------------------------------------------------------------------------
    def _cluster(self, keys: torch.Tensor, first: int) -> _PromptUnits:
        L, H, N, D = keys.shape
        k = max(1, math.ceil(N / self.config.cluster_size))
        x = keys.reshape(L * H, N, D)
        centroids, assign, counts = kernels.kmeans(x, k, self.config.kmeans_iters)
        unit_sorted, order = torch.sort(assign, dim=1, stable=True)
        start = torch.cumsum(counts, dim=1) - counts
        return _PromptUnits(centroids.float(), order + first, unit_sorted, start, counts)

    def _close_segment(self, ctx: PolicyContext, end: int) -> None:
        if end <= self.open_start:
            return
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        reps = torch.stack([ctx.store.keys(layer, self.open_start, end).float().mean(dim=1) for layer in range(L)])
        self.seg_reps.append(reps.reshape(L * H, -1).to(ctx.ws.keys.device))
        self.seg_bounds.append((self.open_start, end))
        self.open_start = self.closed_upto = end

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        """query [L, Hq, D] -> the retrieved positions [L, H, R] for `layers` (others kept)."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        R, G, B = self.config.budget, self.layout.group_size, L * H
        device = ctx.ws.keys.device
        q = query.float().reshape(L, H, G, D).reshape(B, G, D)
        reps, sizes = [], []
        if self.prompt is not None:
            reps.append(self.prompt.centroids)
            sizes.append(self.prompt.sizes)
        if self.seg_reps:
            reps.append(torch.stack(self.seg_reps, dim=1))
            seg_sizes = torch.tensor([b - a for a, b in self.seg_bounds], dtype=torch.int64, device=device)
            sizes.append(seg_sizes.expand(B, -1))
        if not reps:
            return Selection(ctx.ws.retrieved_positions())
        all_reps, all_sizes = torch.cat(reps, dim=1), torch.cat(sizes, dim=1)
        scores = kernels.score_units(q, all_reps, all_sizes > 0, agg=self.config.aggregate)
        take = kernels.select_under_budget(scores, all_sizes, R)  # [B, U + Sg]
        candidates, chosen = [], []
        U = 0
        if self.prompt is not None:
            p = self.prompt
            U = p.sizes.shape[1]
            rank = torch.arange(p.order.shape[1], device=device).expand(B, -1) - torch.gather(p.start, 1, p.unit_of)
            candidates.append(p.order)
            chosen.append(rank < torch.gather(take[:, :U], 1, p.unit_of))
        if self.seg_bounds:
            first, last = self.seg_bounds[0][0], self.seg_bounds[-1][1]
            positions = torch.arange(first, last, dtype=torch.int64, device=device)
            seg_start = torch.tensor([a for a, _ in self.seg_bounds], dtype=torch.int64, device=device)
            seg_of = torch.bucketize(positions, seg_start, right=True) - 1
            rank = positions - seg_start[seg_of]
            candidates.append(positions.expand(B, -1))
            chosen.append(rank.expand(B, -1) < take[:, U:][:, seg_of])
        new = compact(torch.cat(chosen, dim=1), torch.cat(candidates, dim=1), R).view(L, H, R)
        units = int((take > 0).sum())
        if len(layers) < L:
            current = ctx.ws.retrieved_positions().to(device)
            index = torch.tensor(layers, device=device)
            current[index] = new[index]
            new = current
        return Selection(new, units=units)
