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
from kvrecall.server.working_set import to_device
from kvrecall.v1 import kvrecall_pb2 as pb


@dataclass
class LouisKVConfig:
    """Defaults chosen by measurement on SmolLM2-135M (docs/TUNING.md)."""

    budget: int = 512  # retrieved tokens per (layer, KV head)
    n_sink: int = 16  # first tokens always resident
    window: int = 64  # recent-window ring slots
    cluster_size: int = 16  # mean prompt tokens per cluster
    kmeans_iters: int = 4  # Lloyd iterations
    threshold: float = 0.85  # boundary when mean query cosine similarity < threshold
    max_segment: int = 64  # an open output segment closes at this many tokens
    aggregate: str = "max"  # grouped query heads: "max" or "sum" of unit scores

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
    order: torch.Tensor  # [B, N] positions sorted by unit
    unit_of: torch.Tensor  # [B, N] unit of each entry of `order`
    rank: torch.Tensor  # [B, N] index of each entry of `order` inside its unit
    sizes: torch.Tensor  # [B, U] tokens per unit


class _Growing:
    """A device buffer whose dimension `dim` grows by doubling; `view()` is the filled part."""

    def __init__(self, like: torch.Tensor, dim: int) -> None:
        self.dim, self.length = dim, 0
        self.data = like.new_empty(like.shape[:dim] + (16,) + like.shape[dim + 1 :])

    def append(self, chunk: torch.Tensor) -> None:
        n = chunk.shape[self.dim]
        if self.length + n > self.data.shape[self.dim]:
            shape = list(self.data.shape)
            shape[self.dim] = max(2 * shape[self.dim], self.length + n)
            bigger = self.data.new_empty(shape)
            bigger.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data = bigger
        self.data.narrow(self.dim, self.length, n).copy_(chunk)
        self.length += n

    def view(self) -> torch.Tensor:
        return self.data.narrow(self.dim, 0, self.length)


@register
class LouisKVPolicy(Policy):
    name = "louiskv"
    proto_field = "louiskv"
    Config = LouisKVConfig

    def __init__(self, config: LouisKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.prompt: _PromptUnits | None = None
        self.seg_bounds: list[tuple[int, int]] = []
        self.open_start = 0  # first token of the open output segment
        self.closed_upto = 0  # tokens [prompt_evicted, closed_upto) are in closed segments
        # Closed segments, on the device: reps [B, Sg, D] f32, sizes [Sg], and per output
        # token (from the first segment's start) its segment and its index inside it.
        self.seg_reps: _Growing | None = None
        self.seg_sizes: _Growing | None = None
        self.token_seg: _Growing | None = None
        self.token_rank: _Growing | None = None
        self.open_sum: torch.Tensor | None = None  # [B, D] f32: keys of the open segment, summed

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
        return self._select(
            ctx, queries[:, :, -1].to(ctx.ws.keys.device), list(range(self.layout.num_layers))
        )

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        # The evicted tokens are still in the ring: their keys join the open segment's sum.
        for lo, hi in ctx.ws.ring_spans(start, end):
            part = ctx.ws.keys[:, :, lo:hi].float().sum(dim=2).view(-1, self.layout.head_dim)
            self.open_sum = part if self.open_sum is None else self.open_sum + part
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
        rank = torch.arange(N, device=keys.device).expand(L * H, -1) - torch.gather(start, 1, unit_sorted)
        return _PromptUnits(centroids.float(), order + first, unit_sorted, rank, counts)

    def _close_segment(self, ctx: PolicyContext, end: int) -> None:
        """Tokens [open_start, end) (all evicted, so summed in open_sum) become a unit whose
        representative is their mean key."""
        if end <= self.open_start or self.open_sum is None:
            return
        n = end - self.open_start
        device = self.open_sum.device
        mean = (self.open_sum / n).unsqueeze(1)  # [B, 1, D]
        if self.seg_reps is None:
            self.seg_reps = _Growing(mean, 1)
            self.seg_sizes = _Growing(torch.empty(1, dtype=torch.int64, device=device), 0)
            self.token_seg = _Growing(torch.empty(1, dtype=torch.int64, device=device), 0)
            self.token_rank = _Growing(torch.empty(1, dtype=torch.int64, device=device), 0)
        index = len(self.seg_bounds)
        self.seg_reps.append(mean)
        self.seg_sizes.append(torch.full((1,), n, dtype=torch.int64, device=device))
        self.token_seg.append(torch.full((n,), index, dtype=torch.int64, device=device))
        self.token_rank.append(torch.arange(n, dtype=torch.int64, device=device))
        self.seg_bounds.append((self.open_start, end))
        self.open_start = self.closed_upto = end
        self.open_sum = None

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        """query [L, Hq, D] -> the retrieved positions [L, H, R] for `layers` (others kept).

        All on the device, no host sync: the number of units chosen stays a device scalar."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        R, G, B = self.config.budget, self.layout.group_size, L * H
        device = ctx.ws.keys.device
        q = query.float().reshape(B, G, D)
        reps, sizes = [], []
        if self.prompt is not None:
            reps.append(self.prompt.centroids)
            sizes.append(self.prompt.sizes)
        if self.seg_bounds:
            reps.append(self.seg_reps.view())
            sizes.append(self.seg_sizes.view().expand(B, -1))
        if not reps:
            return Selection(ctx.ws.retrieved_positions())
        all_reps = reps[0] if len(reps) == 1 else torch.cat(reps, dim=1)
        all_sizes = sizes[0] if len(sizes) == 1 else torch.cat(sizes, dim=1)
        scores = kernels.score_units(q, all_reps, all_sizes > 0, agg=self.config.aggregate)
        take = kernels.select_under_budget(scores, all_sizes, R)  # [B, U + Sg]
        candidates, chosen = [], []
        U = 0
        if self.prompt is not None:
            p = self.prompt
            U = p.sizes.shape[1]
            candidates.append(p.order)
            chosen.append(p.rank < torch.gather(take[:, :U], 1, p.unit_of))
        if self.seg_bounds:
            first = self.seg_bounds[0][0]
            seg_of = self.token_seg.view()
            candidates.append(torch.arange(first, first + seg_of.shape[0], device=device).expand(B, -1))
            chosen.append(self.token_rank.view() < take[:, U:][:, seg_of])
        new = compact(torch.cat(chosen, dim=1), torch.cat(candidates, dim=1), R).view(L, H, R)
        units = (take > 0).sum()
        if len(layers) < L:
            current = ctx.ws.retrieved_positions()
            index = to_device(torch.tensor(layers), device)
            current[index] = new[index]
            new = current
        return Selection(new, units=units)
