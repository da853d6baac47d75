"""`snapkv` (SnapKV, Li et al., arXiv 2404.14469): observation-window token selection.

At ingest the queries of the last `observation` prompt tokens attend over the prompt; the
attention mass each token receives (summed over the observation queries and the grouped
query heads, then max-pooled over `pool_kernel` neighbours) ranks the tokens that left the
window, and the top `budget` per (layer, KV head) are kept. Nothing is retrieved later.
Shapes: queries [L, Hq, n_obs, D]; prompt keys [L, H, T, D]; selection [L, H, R].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvrecall.server.layout import WorkingSetPlan
from kvrecall.server.policies.base import (
    Policy,
    PolicyContext,
    Selection,
    check,
    check_resident,
    fill_free_slots,
    register,
    resident_plan,
)


@dataclass
class SnapKVConfig:
    budget: int = 512  # selected prompt tokens per (layer, KV head)
    n_sink: int = 16
    window: int = 64
    pool_kernel: int = 7  # odd max-pool width over token scores
    observation: int = 16  # last prompt tokens whose queries vote

    def __post_init__(self) -> None:
        check_resident(self)
        check(self.pool_kernel % 2 == 1 and self.pool_kernel <= 63, "pool_kernel", "must be odd and <= 63")
        check(1 <= self.observation <= 1024, "observation", "must be in [1, 1024]")


def observation_scores(
    queries: torch.Tensor, keys: torch.Tensor, group: int, causal: bool = True, weights: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention mass per token: queries [Hq, n, D], keys [H, T, D] -> [H, T] float32. With
    `causal` the queries are the last n of the T tokens (causal among themselves); without,
    they come after every key (a chunk's queries over the tokens before it). `weights` [n]:
    each query's share of the vote (None: every query alike)."""
    Hq, n, D = queries.shape
    T = keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=0)
    logits = queries.float() @ k.transpose(1, 2) / D**0.5  # [Hq, n, T]
    if causal:
        future = (
            torch.arange(T, device=keys.device)[None, :] > (T - n + torch.arange(n, device=keys.device))[:, None]
        )
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if weights is not None:
        probs = probs * weights.to(probs.device, torch.float32)[None, :, None]
    return probs.sum(dim=1).view(-1, group, T).sum(dim=1)


def scale_weights(n: int) -> torch.Tensor:
    """Per query of the last n (oldest first), its weight in the sum of the mean votes of the
    last 4, 8, 16, ... queries up to n (n itself included): the latest queries, those closest
    to what is asked, count in every scale ("scales" observation vote)."""
    weights = torch.zeros(n, dtype=torch.float32)
    sizes = [size for size in (4 << k for k in range(16)) if size < n] + [n]
    for size in sizes:
        weights[n - size :] += 1.0 / size
    return weights


def top_voted(
    queries: torch.Tensor, keys: torch.Tensor, group: int, span: tuple[int, int], count: int, pool_kernel: int,
    causal: bool = True, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The `count` tokens of positions [start, end) = `span` that receive the most attention mass
    from queries [Hq, n, D] over keys [H, T, D] (max-pooled over `pool_kernel` neighbours), best
    first: [H, count] int64 on the keys' device (see observation_scores for `causal`, `weights`)."""
    start, end = span
    mass = observation_scores(queries.to(keys.device), keys, group, causal, weights)
    pooled = F.max_pool1d(mass[None], pool_kernel, stride=1, padding=pool_kernel // 2)[0]
    return pooled[:, start:end].topk(count, dim=-1).indices + start


def ranked_selection(ranked: torch.Tensor) -> Selection:
    """The Selection of ObservationRanking's tokens [L, H, budget]: ascending, -1 padded."""
    L, H, _ = ranked.shape
    count = int((ranked[0, 0] >= 0).sum())  # every row ranks the same number of tokens
    return Selection(ascending(ranked), units=L * H * count)


def ascending(positions: torch.Tensor) -> torch.Tensor:
    """Positions [..., R] (-1 = none) sorted ascending with the -1 padding last."""
    big = torch.iinfo(positions.dtype).max
    ordered = torch.where(positions < 0, big, positions).sort(dim=-1).values
    return torch.where(ordered == big, -1, ordered)


class ObservationRanking:
    """Per layer, the `budget` tokens that left the window at ingest receiving the most
    attention from the observation queries (max-pooled over `pool_kernel` neighbours), best
    first: `ranked` CPU int64 [L, H, budget], -1 padded, so the first k of a row are its top k."""

    def __init__(self, num_layers: int, num_kv_heads: int, budget: int, pool_kernel: int, vote: str = "flat") -> None:
        self.ranked = torch.full((num_layers, num_kv_heads, budget), -1, dtype=torch.int64)
        self.pool_kernel = pool_kernel
        self.vote = vote  # "flat": every observation query alike; "scales": scale_weights
        self.any = False  # whether a layer was ranked

    def rank_layer(self, ctx: PolicyContext, layer: int, keys: torch.Tensor, queries: torch.Tensor | None) -> None:
        """keys [H, T, D] of `layer`'s prompt, queries [Hq, n, D] (None: nothing to rank)."""
        start, end = ctx.ingest_range
        if queries is None or end <= start:
            return
        count = min(self.ranked.shape[-1], end - start)
        weights = scale_weights(queries.shape[1]) if self.vote == "scales" else None
        top = top_voted(queries, keys, ctx.layout.group_size, (start, end), count, self.pool_kernel, weights=weights)
        self.ranked[layer, :, :count] = top.cpu()
        self.any = True


@register
class SnapKVPolicy(Policy):
    name = "snapkv"
    proto_field = "snapkv"
    Config = SnapKVConfig

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def observation(self) -> int:
        return self.config.observation

    def __init__(self, config: SnapKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.ranking = ObservationRanking(layout.num_layers, layout.num_kv_heads, config.budget, config.pool_kernel)

    def on_ingest_layer(self, ctx: PolicyContext, layer: int, kv: torch.Tensor, queries: torch.Tensor | None) -> None:
        self.ranking.rank_layer(ctx, layer, kv[0], queries)

    def on_ingest_done(self, ctx: PolicyContext) -> Selection | None:
        return ranked_selection(self.ranking.ranked) if self.ranking.any else None

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        return fill_free_slots(ctx, start, end)
