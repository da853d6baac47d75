"""`quest` (Quest, Tang et al., arXiv 2406.10774): page-level top-k, retrieved every step.

Tokens that left the window are grouped in pages of `page_size` consecutive tokens; each
page keeps the element-wise min and max of its keys. Every decode step, per layer, the
query bounds each page's best dot product (sum_d max(q_d * min_d, q_d * max_d), max over
the grouped query heads) and the top pages fill `budget` tokens. The worker asks per layer
before that layer's attention (BOUNDARY_MODE_EVERY_STEP), so the query is the current one.
Shapes: page bounds [L, H, P, D] (the layout dtype when 16-bit); selection [L, H, R]. A chunk's
boundary carries several queries per head: a page's bound is the best over all of them.
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
        self.pages = 0      # pages in use (the last may be partial)
        self.kmin: torch.Tensor | None = None  # [L, H, max pages, D], allocated once
        self.kmax: torch.Tensor | None = None
        self.last_queries: list[torch.Tensor] = []  # per layer at ingest: the last prompt query [Hq, D]

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule(pb.BOUNDARY_MODE_EVERY_STEP, 1.0)

    def observation(self) -> int:
        return 1

    @property
    def num_units(self) -> int:
        return self.layout.num_layers * self.layout.num_kv_heads * self.pages

    def _bounds_dtype(self) -> torch.dtype:
        return self.layout.dtype if self.layout.dtype in (torch.float16, torch.bfloat16) else torch.float32

    def _max_pages(self) -> int:
        return -(-self.layout.max_tokens // self.config.page_size) + 1

    def metadata_bytes(self) -> int:
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        itemsize = torch.empty((), dtype=self._bounds_dtype()).element_size()
        return 2 * L * H * self._max_pages() * D * itemsize

    def _allocate(self, device: torch.device) -> None:
        if self.kmin is None:
            L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
            shape = (L, H, self._max_pages(), D)
            self.kmin = torch.zeros(shape, dtype=self._bounds_dtype(), device=device)
            self.kmax = torch.zeros_like(self.kmin)

    def on_ingest_layer(self, ctx: PolicyContext, layer: int, kv: torch.Tensor, queries: torch.Tensor | None) -> None:
        start, end = ctx.ingest_range
        if end > start:
            device = ctx.ws.keys.device
            self._allocate(device)
            kmin, kmax = kernels.quest_page_bounds(kv[0, :, start:end].to(device), self.config.page_size)
            self.kmin[layer, :, : kmin.shape[1]] = kmin
            self.kmax[layer, :, : kmax.shape[1]] = kmax
        if queries is not None:
            self.last_queries.append(queries[:, -1])

    def on_ingest_done(self, ctx: PolicyContext) -> Selection | None:
        start, end = ctx.ingest_range
        self.first, self.end = start, max(start, end)  # pages start after the sinks
        self.pages = -(-(self.end - self.first) // self.config.page_size)
        if len(self.last_queries) < self.layout.num_layers:
            return None
        queries = torch.stack(self.last_queries)
        self.last_queries = []
        return self._select(ctx, queries, list(range(self.layout.num_layers)))

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        self._extend(ctx, end)
        return fill_free_slots(ctx, start, end)

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        return self._select(ctx, query, layers)

    def _extend(self, ctx: PolicyContext, end: int) -> None:
        """Page the tokens [self.end, end) (from the host tier), recomputing the last partial page."""
        if end <= self.end:
            return
        P = self.config.page_size
        first_page = (self.end - self.first) // P
        start = self.first + first_page * P
        device = ctx.ws.keys.device
        self._allocate(device)
        keys = torch.stack([ctx.store.keys(layer, start, end) for layer in range(self.layout.num_layers)]).to(device)
        L, H, N, D = keys.shape
        kmin, kmax = kernels.quest_page_bounds(keys.reshape(L * H, N, D), P)
        pages = kmin.shape[1]
        self.kmin[:, :, first_page : first_page + pages] = kmin.view(L, H, pages, D)
        self.kmax[:, :, first_page : first_page + pages] = kmax.view(L, H, pages, D)
        self.pages = first_page + pages
        self.end = end

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        current = ctx.ws.retrieved_positions()
        if self.kmin is None or self.pages == 0:
            return Selection(current)
        device = self.kmin.device
        H, D, R, P = self.layout.num_kv_heads, self.layout.head_dim, self.config.budget, self.config.page_size
        index = torch.tensor(layers, device=device)
        n = len(layers) * H
        q = query.to(device).float()[index].reshape(n, -1, D)  # [n, G (x queries per head), D]
        pages = self.pages
        kmin = self.kmin[index, :, :pages].reshape(n, pages, D)
        kmax = self.kmax[index, :, :pages].reshape(n, pages, D)
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
