"""`louiskv` — semantic-boundary KV retrieval (LouisKV, ICLR 2026, arXiv 2510.11292).

* Prompt: per (layer, KV head), the keys that left the window at ingest are clustered by
  k-means into units of ~`cluster_size` tokens; a unit's representative is its centroid.
* Output: tokens leaving the window join an open *segment*; a segment closes at a boundary
  (or at `max_segment` tokens) and its representative is the mean of its keys.
* Ingest (`ingest_select="tokens"`): the first selection takes single prompt tokens by the
  attention the last `observation` prompt queries pay them (SnapKV's vote, max-pooled); the
  best `pin_ingest` fraction of the budget of them stays pinned through later retrievals.
* Boundary (the worker saw its query drift below `threshold`): the query [L, Hq, D] scores
  every unit per KV head (grouped query heads aggregated by `aggregate`), the best units fill
  the unpinned part of `budget` (the last one partially; a row whose units all fit takes them
  all), and the working set keeps what is already resident and gathers the rest from the
  host tier.
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
    fill_free_slots,
    register,
    resident_plan,
)
from kvrecall.server.policies.snapkv import ascending, rank_by_observation, ranked_selection
from kvrecall.server.working_set import to_device
from kvrecall.v1 import kvrecall_pb2 as pb

POOL_KERNEL = 7  # max-pool width of the token votes at ingest (SnapKV's)


@dataclass
class LouisKVConfig:
    """Defaults chosen by measurement on SmolLM2-135M (docs/TUNING.md)."""

    budget: int = 512  # retrieved tokens per (layer, KV head)
    n_sink: int = 16  # first tokens always resident
    window: int = 64  # recent-window ring slots
    cluster_size: int = 16  # mean prompt tokens per cluster
    kmeans_iters: int = 4  # Lloyd iterations
    threshold: float = 0.75  # boundary when mean query cosine similarity < threshold
    max_segment: int = 64  # an open output segment closes at this many tokens
    pre_rope: bool = False  # boundary signal on queries with RoPE undone (position-free)
    observation: int = 16  # last prompt queries choosing the first retrieval, at ingest
    ingest_select: str = "tokens"  # first retrieval: "tokens" (observation attention) or "units"
    aggregate: str = "max"  # grouped query heads: "max" or "sum" of unit scores
    pin_ingest: float = 0.25  # budget fraction keeping the best ingest tokens through retrievals

    def __post_init__(self) -> None:
        check_resident(self)
        check(1 <= self.cluster_size <= 4096, "cluster_size", "must be in [1, 4096]")
        check(0 <= self.kmeans_iters <= 100, "kmeans_iters", "must be in [0, 100]")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1]")
        check(1 <= self.max_segment <= 1 << 16, "max_segment", "must be in [1, 65536]")
        check(self.aggregate in ("max", "sum"), "aggregate", "must be 'max' or 'sum'")
        check(1 <= self.observation <= 256, "observation", "must be in [1, 256]")
        check(self.ingest_select in ("tokens", "units"), "ingest_select", "must be 'tokens' or 'units'")
        check(0.0 <= self.pin_ingest <= 1.0, "pin_ingest", "must be in [0, 1]")

    @property
    def pinned_tokens(self) -> int:
        """Retrieved slots held by the ingest selection's best tokens (ingest_select=tokens)."""
        return round(self.pin_ingest * self.budget) if self.ingest_select == "tokens" else 0


class _Growing:
    """A device buffer growing along dim 1 (amortised: by a quarter at least); `view()` is
    the filled part."""

    def __init__(self, first: torch.Tensor) -> None:
        self.data, self.length = first.contiguous(), first.shape[1]

    def append(self, chunk: torch.Tensor) -> None:
        n = chunk.shape[1]
        if self.length + n > self.data.shape[1]:
            shape = list(self.data.shape)
            shape[1] = max(self.length + n, self.length * 5 // 4 + 64)
            bigger = self.data.new_empty(shape)
            bigger[:, : self.length] = self.view()
            self.data = bigger
        self.data[:, self.length : self.length + n] = chunk
        self.length += n

    def view(self) -> torch.Tensor:
        return self.data[:, : self.length]


class _UnitTable:
    """Every retrieval unit of one session on the device, prompt clusters first, then closed
    output segments, so a boundary reads them as views (no concatenation, no host data).

    Per unit: reps [B, U, D] f32, sizes [B, U] and valid (size > 0). Per candidate token,
    grouped by unit: position [B, M], unit [B, M] and rank inside its unit [B, M] (int32)."""

    def __init__(
        self,
        reps: torch.Tensor,
        sizes: torch.Tensor,
        position: torch.Tensor,
        unit: torch.Tensor,
        rank: torch.Tensor,
    ) -> None:
        self.reps, self.sizes, self.valid = _Growing(reps), _Growing(sizes), _Growing(sizes > 0)
        self.position, self.unit, self.rank = _Growing(position), _Growing(unit), _Growing(rank.int())

    @property
    def num_units(self) -> int:
        return self.sizes.length

    def append(
        self,
        reps: torch.Tensor,
        sizes: torch.Tensor,
        position: torch.Tensor,
        unit: torch.Tensor,
        rank: torch.Tensor,
    ) -> None:
        parts = (self.reps, self.sizes, self.valid, self.position, self.unit, self.rank)
        for part, chunk in zip(parts, (reps, sizes, sizes > 0, position, unit, rank), strict=True):
            part.append(chunk)


@register
class LouisKVPolicy(Policy):
    name = "louiskv"
    proto_field = "louiskv"
    Config = LouisKVConfig

    def __init__(self, config: LouisKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.units: _UnitTable | None = None
        self.prompt_units = 0  # non-empty prompt clusters over all rows
        self.seg_bounds: list[tuple[int, int]] = []
        self.open_start = 0  # first token of the open output segment
        self.closed_upto = 0  # tokens [prompt_evicted, closed_upto) are in closed segments
        self.open_sum: torch.Tensor | None = None  # [B, D] f32: keys of the open segment, summed
        self.pinned: torch.Tensor | None = None  # [B, P] ascending, -1 padded: kept by every retrieval

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule(pb.BOUNDARY_MODE_THRESHOLD, self.config.threshold, self.config.pre_rope)

    def observation(self) -> int:
        return self.config.observation

    @property
    def num_units(self) -> int:
        return self.prompt_units + len(self.seg_bounds) * self.layout.num_layers * self.layout.num_kv_heads

    # ---- hooks ------------------------------------------------------------------------
    def on_ingest(self, ctx: PolicyContext, queries: torch.Tensor | None) -> Selection | None:
        start, end = min(ctx.ws.plan.n_sink, ctx.prompt_tokens), ctx.evicted_upto
        self.open_start = self.closed_upto = end
        if end > start:
            keys = ctx.prompt_kv[:, 0, :, start:end]  # [L, H, N, D]
            self._cluster(keys.to(ctx.ws.keys.device), start)
        if queries is None:
            return None
        obs = queries[:, :, -self.config.observation :]
        if self.config.ingest_select == "tokens":
            # The prompt's keys are all at hand once: the first retrieval takes single tokens by
            # the attention the last prompt queries pay them (SnapKV's vote); units serve later,
            # next to the best `pinned_tokens` of them, which every retrieval keeps.
            ranked = rank_by_observation(ctx, obs, self.config.budget, POOL_KERNEL)
            if ranked is None:
                return None
            pinned = self.config.pinned_tokens
            if pinned:
                rows = ascending(ranked[:, :, :pinned]).view(-1, pinned)
                self.pinned = to_device(rows, ctx.ws.keys.device)
            return ranked_selection(ranked)
        # Or every unit scored by those queries, the best over them (as over a group's heads).
        return self._select(ctx, obs.to(ctx.ws.keys.device), list(range(self.layout.num_layers)))

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        # The evicted tokens are still in the ring: their keys join the open segment's sum.
        for lo, hi in ctx.ws.ring_spans(start, end):
            part = ctx.ws.keys[:, :, lo:hi].sum(dim=2, dtype=torch.float32).view(-1, self.layout.head_dim)
            self.open_sum = part if self.open_sum is None else self.open_sum + part
        if end - self.open_start >= self.config.max_segment:
            self._close_segment(ctx, end)
        return fill_free_slots(ctx, start, end)

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        self._close_segment(ctx, ctx.evicted_upto)
        return self._select(ctx, query.to(ctx.ws.keys.device), layers)

    # ---- units --------------------------------------------------------------------------
    def _cluster(self, keys: torch.Tensor, first: int) -> None:
        """Prompt keys [L, H, N, D] (token 0 = position `first`) -> the first units of the table."""
        L, H, N, D = keys.shape
        k = max(1, math.ceil(N / self.config.cluster_size))
        x = keys.reshape(L * H, N, D)
        centroids, assign, counts = kernels.kmeans(x, k, self.config.kmeans_iters)
        unit_sorted, order = torch.sort(assign, dim=1, stable=True)
        start = torch.cumsum(counts, dim=1) - counts
        rank = torch.arange(N, device=keys.device).expand(L * H, -1) - torch.gather(start, 1, unit_sorted)
        self.units = _UnitTable(centroids.float(), counts, order + first, unit_sorted, rank)
        self.prompt_units = int((counts > 0).sum())

    def _close_segment(self, ctx: PolicyContext, end: int) -> None:
        """Tokens [open_start, end) (all evicted, so summed in open_sum) become a unit whose
        representative is their mean key."""
        if end <= self.open_start or self.open_sum is None:
            return
        n, B = end - self.open_start, self.open_sum.shape[0]
        device = self.open_sum.device
        mean = (self.open_sum / n).unsqueeze(1)  # [B, 1, D]
        sizes = torch.full((B, 1), n, dtype=torch.int64, device=device)
        positions = torch.arange(self.open_start, end, device=device).expand(B, -1)
        rank = torch.arange(n, dtype=torch.int32, device=device).expand(B, -1)
        index = 0 if self.units is None else self.units.num_units
        unit = torch.full((B, n), index, dtype=torch.int64, device=device)
        if self.units is None:
            self.units = _UnitTable(mean, sizes, positions, unit, rank)
        else:
            self.units.append(mean, sizes, positions, unit, rank)
        self.seg_bounds.append((self.open_start, end))
        self.open_start = self.closed_upto = end
        self.open_sum = None

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        """query [L, Hq, D] or [L, Hq, n, D] (n queries per head) -> the retrieved positions
        [L, H, R] for `layers` (others kept).

        All on the device, no host sync: the number of units chosen stays a device scalar."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        R, B = self.config.budget, L * H
        table = self.units
        if table is None:
            return Selection(ctx.ws.retrieved_positions())
        pinned = self.pinned
        free = R - (0 if pinned is None else pinned.shape[1])  # slots the units fill
        q = query.reshape(B, -1, D)  # [B, G * n, D], its own dtype: scoring computes in float32
        scores = kernels.score_units(q, table.reps.view(), table.valid.view(), agg=self.config.aggregate)
        sizes = table.sizes.view()
        take = kernels.select_under_budget(scores, sizes, free)  # [B, units]
        if pinned is not None:
            # A row whose units all fit the budget takes them all (exact, its pinned tokens among
            # them); the others keep their pinned tokens and fill the rest with the best units.
            whole = torch.where(scores > float("-inf"), sizes.long().clamp_min(0), 0)
            fits = whole.sum(dim=1, keepdim=True) <= R  # [B, 1]
            take = torch.where(fits, whole, take)
        new = kernels.expand_selection(take, table.unit.view(), table.rank.view(), table.position.view(), R)
        if pinned is not None:
            mixed = torch.cat([pinned, _drop_members(new[:, :free], pinned)], dim=1)
            new = torch.where(fits, new, mixed)
        new = new.view(L, H, R)
        units = (take > 0).sum()
        if len(layers) < L:
            current = ctx.ws.retrieved_positions()
            index = to_device(torch.tensor(layers), new.device)
            current[index] = new[index]
            new = current
        return Selection(new, units=units)


def _drop_members(positions: torch.Tensor, pinned: torch.Tensor) -> torch.Tensor:
    """positions [B, n] with every entry that row b of `pinned` [B, P] (ascending, -1 padded)
    holds set to -1, so a row of the two together names each token once. No host sync."""
    big = torch.iinfo(pinned.dtype).max
    keys = torch.where(pinned < 0, big, pinned)  # still ascending: the padding is last
    at = torch.searchsorted(keys, positions.contiguous()).clamp_(max=keys.shape[1] - 1)
    member = (torch.gather(keys, 1, at) == positions) & (positions >= 0)
    return torch.where(member, -1, positions)
