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


def observation_scores(queries: torch.Tensor, keys: torch.Tensor, group: int) -> torch.Tensor:
    """Attention mass per prompt token: queries [Hq, n, D] (the last n prompt tokens),
    keys [H, T, D] -> [H, T] float32 (causal among the observation tokens)."""
    Hq, n, D = queries.shape
    T = keys.shape[1]
    k = keys.float().repeat_interleave(group, dim=0)
    logits = queries.float() @ k.transpose(1, 2) / D**0.5  # [Hq, n, T]
    future = (
        torch.arange(T, device=keys.device)[None, :] > (T - n + torch.arange(n, device=keys.device))[:, None]
    )
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return probs.sum(dim=1).view(-1, group, T).sum(dim=1)


def select_by_observation(
    ctx: PolicyContext, queries: torch.Tensor | None, budget: int, pool_kernel: int
) -> Selection | None:
    """Per (layer, KV head), the `budget` tokens that left the window at ingest receiving the
    most attention from the observation queries [L, Hq, n, D] (max-pooled over `pool_kernel`
    neighbours), ascending, -1 padded: [L, H, budget]."""
    ranked = rank_by_observation(ctx, queries, budget, pool_kernel)
    return None if ranked is None else ranked_selection(ranked)


def ranked_selection(ranked: torch.Tensor) -> Selection:
    """The Selection of rank_by_observation's tokens [L, H, budget]: ascending, -1 padded."""
    L, H, _ = ranked.shape
    count = int((ranked[0, 0] >= 0).sum())  # every row ranks the same number of tokens
    return Selection(ascending(ranked), units=L * H * count)


def ascending(positions: torch.Tensor) -> torch.Tensor:
    """Positions [..., R] (-1 = none) sorted ascending with the -1 padding last."""
    big = torch.iinfo(positions.dtype).max
    ordered = torch.where(positions < 0, big, positions).sort(dim=-1).values
    return torch.where(ordered == big, -1, ordered)


def rank_by_observation(
    ctx: PolicyContext, queries: torch.Tensor | None, budget: int, pool_kernel: int
) -> torch.Tensor | None:
    """select_by_observation's tokens best first (CPU int64 [L, H, budget], -1 padded), so
    the first k of a row are its top k; None without queries or evicted prompt tokens."""
    start, end = min(ctx.ws.plan.n_sink, ctx.prompt_tokens), ctx.evicted_upto
    if queries is None or end <= start:
        return None
    layout = ctx.layout
    L, H = layout.num_layers, layout.num_kv_heads
    keys = ctx.prompt_kv[:, 0]  # [L, H, T, D]
    queries = queries.to(keys.device)
    ranked = torch.full((L, H, budget), -1, dtype=torch.int64)
    count = min(budget, end - start)
    pad = pool_kernel // 2
    for layer in range(L):
        mass = observation_scores(queries[layer], keys[layer], layout.group_size)
        pooled = F.max_pool1d(mass[None], pool_kernel, stride=1, padding=pad)[0]
        ranked[layer, :, :count] = (pooled[:, start:end].topk(count, dim=-1).indices + start).cpu()
    return ranked


@register
class SnapKVPolicy(Policy):
    name = "snapkv"
    proto_field = "snapkv"
    Config = SnapKVConfig

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def observation(self) -> int:
        return self.config.observation

    def on_ingest(self, ctx: PolicyContext, queries: torch.Tensor | None) -> Selection | None:
        return select_by_observation(ctx, queries, self.config.budget, self.config.pool_kernel)

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        return fill_free_slots(ctx, start, end)
