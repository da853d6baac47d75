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

import dataclasses
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
class QuestConfig:
    budget: int = 512     # retrieved tokens per (layer, KV head)
    n_sink: int = 16
    window: int = 64
    page_size: int = 16   # tokens per page
    exact_chunks: bool = True  # a chunk attends exactly over every earlier token (the host tier), not the working set

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
        index = torch.tensor(layers, device=device)
        n = len(layers) * self.layout.num_kv_heads
        chosen, take = choose_pages(
            query.to(device)[index].reshape(n, -1, self.layout.head_dim), self.kmin[index, :, : self.pages],
            self.kmax[index, :, : self.pages], torch.tensor([[self.first, self.end]], device=device),
            self.end - self.first, self.config,
        )  # fmt: skip
        current = current.to(device)
        current[index] = chosen.view(len(layers), self.layout.num_kv_heads, -1)
        return Selection(current, units=int((take > 0).sum()))

    # ---- several sessions at once (a Boundaries call) ------------------------------------
    def batch_key(self) -> tuple:
        """Same layout and settings: the same page-bound shapes."""
        return self.layout, dataclasses.astuple(self.config)

    @classmethod
    def on_boundaries(cls, items: list[tuple[Policy, PolicyContext, torch.Tensor]]) -> list[Selection | None]:
        """The sessions with pages are scored, selected and expanded together: their page
        bounds stacked up to the widest (a session's pages past its own are empty, so never
        chosen), one scoring, one selection, one expansion; each gets what _select gives it."""
        paged = [(i, policy, query) for i, (policy, _, query) in enumerate(items) if policy.pages and policy.kmin is not None]
        out = [None if policy.pages and policy.kmin is not None else Selection(ctx.ws.retrieved_positions())
               for policy, ctx, _ in items]  # fmt: skip
        if not paged:
            return out
        policies = [policy for _, policy, _ in paged]
        first = policies[0]
        L, H, D = first.layout.num_layers, first.layout.num_kv_heads, first.layout.head_dim
        device = first.kmin.device
        pages = max(policy.pages for policy in policies)
        spans = to_device(torch.tensor([[policy.first, policy.end] for policy in policies]), device)
        chosen, take = choose_pages(
            torch.cat([query.to(device).reshape(L * H, -1, D) for _, _, query in paged]),
            torch.cat([policy.kmin[:, :, :pages] for policy in policies]),
            torch.cat([policy.kmax[:, :, :pages] for policy in policies]),
            spans, max(policy.end - policy.first for policy in policies), first.config,
        )  # fmt: skip
        units = (take > 0).view(len(policies), -1).sum(dim=1)  # stays on the device
        for (i, _, _), block, count in zip(paged, chosen.view(len(policies), L, H, -1), units, strict=True):
            out[i] = Selection(block, units=count)
        return out


def choose_pages(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, spans: torch.Tensor, tokens: int, config: QuestConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's retrieval for S sessions' rows at once: q [S * n, G, D] (n rows each),
    kmin / kmax [S * l, H, P, D] with S * l * H = S * n, spans [S, 2] int64 (each session's
    paged tokens [first, end)), `tokens` >= the most paged tokens of any session ->
    (positions [S * n, budget] -1 padded, tokens taken per page [S * n, P]). A page past a
    session's end has no tokens: it scores -inf and is never taken."""
    P, R, D = config.page_size, config.budget, kmin.shape[-1]
    rows, pages = q.shape[0], kmin.shape[2]
    per_session = rows // spans.shape[0]
    first, end = spans[:, :1].repeat_interleave(per_session, 0), spans[:, 1:].repeat_interleave(per_session, 0)
    page_start = first + torch.arange(pages, device=q.device) * P  # [rows, P]
    sizes = torch.clamp(end - page_start, max=P)
    scores = kernels.quest_page_scores(q.float(), kmin.reshape(rows, pages, D), kmax.reshape(rows, pages, D), sizes > 0)
    take = kernels.select_under_budget(scores, sizes, R)
    offset = torch.arange(tokens, device=q.device)  # token offsets from each session's first
    page_of = offset // P
    keep = offset - page_of * P < take[:, page_of]  # past a session's end its pages take nothing
    return compact(keep, first + offset, R), take
