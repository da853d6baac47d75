"""`quest` (Quest, Tang et al., arXiv 2406.10774): page-level top-k, retrieved every step.

Tokens that left the window are grouped in pages of `page_size` consecutive tokens; each
page keeps the element-wise min and max of its keys. Every decode step, per layer, the
query bounds each page's best dot product (sum_d max(q_d * min_d, q_d * max_d), max over
the grouped query heads) and the top pages fill `budget` tokens. The worker asks per layer
before that layer's attention (BOUNDARY_MODE_EVERY_STEP), so the query is the current one.
Shapes: page bounds [B = L * H, P, D]; selection [L, H, R].
"""

from __future__ import annotations

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
class QuestConfig:
    budget: int = 512     # retrieved tokens per (layer, KV head)
    n_sink: int = 16
    window: int = 64
    page_size: int = 16   # tokens per page

    def __post_init__(self) -> None:
        check_resident(self)
        check(1 <= self.page_size <= 1024, "page_size", "must be in [1, 1024]")


@register
class QuestPolicy(Policy):
    name = "quest"
    proto_field = "quest"
    Config = QuestConfig

    def __init__(self, config: QuestConfig, layout) -> None:
        super().__init__(config, layout)
        self.first = 0      # first paged token (after the sinks)
        self.end = 0        # tokens [first, end) are paged
        self.kmin: torch.Tensor | None = None  # [L, H, P, D]
        self.kmax: torch.Tensor | None = None

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule(pb.BOUNDARY_MODE_EVERY_STEP, 1.0)

    def observation(self) -> int:
        return 1

    @property
    def num_units(self) -> int:
        return 0 if self.kmin is None else self.kmin.shape[0] * self.kmin.shape[1] * self.kmin.shape[2]

    def on_ingest(self, ctx: PolicyContext, queries: torch.Tensor | None) -> Selection | None:
        self.first = self.end = min(ctx.ws.plan.n_sink, ctx.prompt_tokens)
        self._extend(ctx, ctx.evicted_upto)
        if queries is None:
            return None
        return self._select(ctx, queries[:, :, -1], list(range(self.layout.num_layers)))

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        self._extend(ctx, end)
        return fill_free_slots(ctx, start, end)

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        return self._select(ctx, query, layers)

    def _extend(self, ctx: PolicyContext, end: int) -> None:
        """Page the tokens [self.end, end), recomputing the last partial page."""
        if end <= self.end:
            return
        P = self.config.page_size
        first_page = (self.end - self.first) // P
        start = self.first + first_page * P
        device = ctx.ws.keys.device
        keys = torch.stack([ctx.store.keys(layer, start, end) for layer in range(self.layout.num_layers)]).to(device)
        L, H, N, D = keys.shape
        kmin, kmax = kernels.quest_page_bounds(keys.reshape(L * H, N, D), P)
        kmin, kmax = kmin.view(L, H, -1, D).float(), kmax.view(L, H, -1, D).float()
        if self.kmin is None:
            self.kmin, self.kmax = kmin, kmax
        else:
            self.kmin = torch.cat((self.kmin[:, :, :first_page], kmin), dim=2)
            self.kmax = torch.cat((self.kmax[:, :, :first_page], kmax), dim=2)
        self.end = end

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        current = ctx.ws.retrieved_positions()
        if self.kmin is None:
            return Selection(current)
        device = self.kmin.device
        H, D, G, R, P = (
            self.layout.num_kv_heads, self.layout.head_dim, self.layout.group_size, self.config.budget,
            self.config.page_size,
        )
        index = torch.tensor(layers, device=device)
        n = len(layers) * H
        q = query.to(device).float()[index].reshape(n, G, D)
        kmin = self.kmin[index].reshape(n, -1, D)
        kmax = self.kmax[index].reshape(n, -1, D)
        pages = kmin.shape[1]
        page_start = self.first + torch.arange(pages, device=device) * P
        sizes = (torch.clamp(self.end - page_start, max=P)).expand(n, -1).contiguous()
        scores = kernels.quest_page_scores(q, kmin, kmax, sizes > 0)
        take = kernels.select_under_budget(scores, sizes, R)
        positions = torch.arange(self.first, self.end, device=device)
        page_of = (positions - self.first) // P
        keep = (positions - page_start[page_of]).expand(n, -1) < take[:, page_of]
        chosen = compact(keep, positions.expand(n, -1), R).view(len(layers), H, R)
        current = current.to(device)
        current[index] = chosen
        return Selection(current, units=int((take > 0).sum()))
