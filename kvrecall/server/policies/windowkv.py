"""`windowkv` (WindowKV: task-adaptive group-wise window selection).

At ingest the queries of the last `suffix` prompt tokens (32 for localisation / QA, 16 for
aggregation tasks) attend over the prompt; the attention mass each token receives (summed
over the observation queries and the grouped query heads of each KV head) is cut into
windows of `window_size` consecutive tokens. A window scores the mean of its top half of
values (localisation) or its plain mean (aggregation); whole windows are kept by rank until
the layer's budget, and the suffix is always kept. Layers form groups of `group_size` that
share one selection: by default every layer of the group votes (their attention masses are
summed, `group_select="sum"`); the paper's rule, the group's first layer selecting alone, is
`group_select="first"` (on SmolLM2 it loses needles its first layer does not attend to:
docs/TUNING.md). The per-layer budget is
uniform or decays arithmetically across groups (`decay`; the mean over layers stays `budget`).
Windows are chosen per KV head.

`variant="paper"` runs the reference implementation's rule instead (WindowKV,
arXiv 2503.17922, github.com/optim996/WindowKV `models/compress_utils.py`): each window is
scored ONCE across all query heads (the mean of the heads' window scores: per head the mean of
its top `window_size // 2` values for localisation, the mean for aggregation) and every head
keeps the same windows; the group's first layer selects alone; the budget decays
arithmetically from `2 * budget - last` (first group) to `last = budget * group_size // 14`
(the reference's default beta) in equal integer steps; the `ceil((N - budget) / window_size)`
lowest windows are dropped (N the candidate tokens). Kept from this implementation in both
variants: sinks and the window ring around the selection, and a budget that counts the
observation suffix (so resident sizes match the other policies at equal `budget`).
`group_select` and `decay` are the tuned variant's settings; `paper` ignores them.

Pruned prompt KV is never retrieved again, unless `keep_pruned_in_host`: then the session
also runs louiskv's boundary retrieval (clustered prompt, segmented output, THRESHOLD rule),
so the WindowKV selection serves until the first boundary and louiskv recalls afterwards,
`budget` tokens per layer, from everything in the host tier.

Shapes: queries [L, Hq, n_obs, D]; prompt keys [L, H, T, D]; selection [L, H, R], where R
(the working set's retrieved slots) is the largest layer budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvrecall import kernels
from kvrecall.kernels.reference import window_lengths
from kvrecall.server.layout import WorkingSetPlan
from kvrecall.server.policies.base import (
    DEFAULT_SPILL_EVERY,
    BoundaryRule,
    Policy,
    PolicyContext,
    Selection,
    check,
    check_resident,
    compact,
    fill_free_slots,
    register,
)
from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy
from kvrecall.server.policies.snapkv import observation_scores
from kvrecall.v1 import kvrecall_pb2 as pb

LOCALIZATION, AGGREGATION = pb.TASK_TYPE_LOCALIZATION, pb.TASK_TYPE_AGGREGATION
SUFFIX = {LOCALIZATION: 32, AGGREGATION: 16}
SCORE_MODE = {LOCALIZATION: "topmean", AGGREGATION: "mean"}
# With `decay`, the last group's budget is this fraction of `budget` (the first gets the rest).
DECAY_LAST = 0.5
PAPER_BETA = 14  # the reference implementation's default: last group budget = budget * group_size // beta
VARIANTS = ("tuned", "paper")


@dataclass
class WindowKVConfig:
    """Defaults and their reasons: docs/TUNING.md (WindowKV)."""

    budget: int = 512  # kept prompt tokens per layer and KV head, mean over layers
    n_sink: int = 16
    window: int = 64
    window_size: int = 8  # tokens per scored window
    group_size: int = 8  # layers per group sharing one selection
    group_select: str = "sum"  # a group's selector: the "sum" of its layers' votes, or its "first" layer
    decay: bool = False  # arithmetic budget decay across groups
    task: int = pb.TASK_TYPE_UNSPECIFIED  # unspecified at the daemon = localisation
    keep_pruned_in_host: bool = False  # louiskv retrieval at boundaries after the prefill selection
    threshold: float = 0.75  # boundary threshold (keep_pruned_in_host only; as louiskv)
    budget_fraction: float | None = None  # budget = round(fraction * prompt tokens), overrides budget
    variant: str = "tuned"  # "tuned" (this page's defaults) or "paper" (the reference implementation's rule)

    def __post_init__(self) -> None:
        check_resident(self)
        check(1 <= self.window_size <= 4096, "window_size", "must be in [1, 4096]")
        check(1 <= self.group_size <= 1024, "group_size", "must be in [1, 1024]")
        check(self.group_select in ("first", "sum"), "group_select", "must be 'first' or 'sum'")
        check(self.variant in VARIANTS, "variant", f"must be one of {VARIANTS}")
        check(self.task in pb.TaskType.values(), "task", f"must be one of {pb.TaskType.keys()}")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1]")
        if self.budget_fraction is not None:
            check(0.0 < self.budget_fraction <= 1.0, "budget_fraction", "must be in (0, 1]")

    @property
    def resolved_task(self) -> int:
        return LOCALIZATION if self.task == pb.TASK_TYPE_UNSPECIFIED else self.task


def layer_budgets(num_layers: int, group_size: int, budget: int, decay: bool) -> list[int]:
    """Tokens each layer keeps: `budget` everywhere, or with `decay` a per-group arithmetic
    sequence from large (first group) to DECAY_LAST * budget (last group) whose mean over
    layers is `budget` (within one token: groups keep whole-token budgets)."""
    groups = [layer // group_size for layer in range(num_layers)]
    last = groups[-1]
    if not decay or last == 0:
        return [budget] * num_layers
    center = sum(groups) / num_layers  # the layer-weighted mean group index
    step = budget * (1.0 - DECAY_LAST) / (last - center)
    per_group = [budget + step * (center - g) for g in range(last + 1)]
    rounded = [max(1, round(b)) for b in per_group]
    # Move the rounding error onto the first group, which holds the most layers per token.
    error = budget * num_layers - sum(rounded[g] for g in groups)
    rounded[0] = max(1, rounded[0] + round(error / groups.count(0)))
    return [rounded[g] for g in groups]


def paper_layer_budgets(num_layers: int, group_size: int, budget: int, beta: int = PAPER_BETA) -> list[int]:
    """The reference implementation's arithmetic decay: the last group keeps
    `budget * group_size // beta`, the first `2 * budget` minus that, the groups between step
    down by `(first - last) // (groups - 1)`. Groups are ceil(num_layers / group_size) (the
    reference assumes they divide evenly); one group keeps `budget`."""
    groups = -(-num_layers // group_size)
    if groups == 1:
        return [budget] * num_layers
    last = budget * group_size // beta
    first = 2 * budget - last
    step = (first - last) // (groups - 1)
    per_group = [first - g * step for g in range(groups - 1)] + [last]
    return [max(1, per_group[layer // group_size]) for layer in range(num_layers)]


def paper_window_scores(mass: torch.Tensor, window_size: int, mode: str) -> torch.Tensor:
    """The reference's window score, one per window for all heads: mass [Hq, N] (attention per
    query head and candidate token) -> [P] float32, P = ceil(N / window_size). "topmean": the
    mean over heads of each head's mean of its top min(window_size // 2, n) values (n the
    window's length); "mean": the mean over heads and tokens."""
    heads, num_tokens = mass.shape
    lengths = window_lengths(num_tokens, window_size, mass.device)
    count = lengths.numel()
    pad = float("-inf") if mode == "topmean" else 0.0
    padded = mass.new_full((heads, count * window_size), pad, dtype=torch.float32)
    padded[:, :num_tokens] = mass.float()
    windows = padded.view(heads, count, window_size)
    if mode == "mean":
        return windows.sum(dim=-1).mean(dim=0) / lengths
    k = max(1, window_size // 2)
    taken = lengths.clamp_max(k)  # [P]
    top = windows.topk(k, dim=-1).values  # [Hq, P, k], -inf padding last
    keep = torch.arange(k, device=mass.device) < taken[:, None]
    return (torch.where(keep, top, 0.0).sum(dim=-1) / taken).mean(dim=0)


def paper_select(mass: torch.Tensor, budget: int, window_size: int, mode: str) -> torch.Tensor:
    """The reference's choice, shared by every head: mass [Hq, N] -> keep [N] bool. All N
    tokens when they fit; else the ceil((N - budget) / window_size) lowest-scoring windows go
    (ties: the later window goes first) and the rest stay, or none when that is every window
    (a short last window kept makes that up to window_size - 1 tokens over the budget)."""
    num_tokens = mass.shape[1]
    if num_tokens <= budget:
        return torch.ones(num_tokens, dtype=torch.bool, device=mass.device)
    scores = paper_window_scores(mass, window_size, mode)
    drop = -(-(num_tokens - max(0, budget)) // window_size)
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=mass.device)
    if drop < scores.numel():
        keep[torch.sort(scores, descending=True, stable=True).indices[: scores.numel() - drop]] = True
    return keep.repeat_interleave(window_size)[:num_tokens]


def select_windows(mass: torch.Tensor, budget: int, window_size: int, mode: str) -> torch.Tensor:
    """Whole windows by rank: mass [H, N] float (attention per candidate token) -> keep [H, N] bool.

    Windows are [0, W), [W, 2W), ... (the last may be short); each scores by `mode`
    ("topmean" or "mean", kernels.window_scores) and the best windows are kept while they fit
    whole in `budget` tokens."""
    H, N = mass.shape
    if N == 0 or budget <= 0:
        return torch.zeros(H, N, dtype=torch.bool, device=mass.device)
    scores = kernels.window_scores(mass.float().contiguous(), window_size, mode)  # [H, P]
    sizes = window_lengths(N, window_size, mass.device).repeat(H, 1)
    take = kernels.select_under_budget(scores, sizes, budget)
    whole = take == sizes
    return whole.repeat_interleave(window_size, dim=1)[:, :N]


@register
class WindowKVPolicy(Policy):
    name = "windowkv"
    proto_field = "windowkv"
    Config = WindowKVConfig

    def __init__(self, config: WindowKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.task = config.resolved_task
        self.suffix = SUFFIX[self.task]
        self.budgets: list[int] = []  # per layer, resolved at ingest
        self.selection: torch.Tensor | None = None  # [L, H, R] CPU, filled group by group at ingest
        self.kept = 0  # selected tokens over all layers and heads
        self.votes: torch.Tensor | None = None  # [H, T] the current group's summed attention mass
        self.recall: LouisKVPolicy | None = None  # keep_pruned_in_host: louiskv over the host tier
        if config.keep_pruned_in_host:  # sized for the plan's budget; rebuilt at ingest for the prompt's
            self.recall = LouisKVPolicy(
                LouisKVConfig(budget=min(self._plan_budget(), 1 << 20), n_sink=config.n_sink, window=config.window,
                              threshold=config.threshold),
                layout,
            )

    def fallback(self) -> str | None:
        if self.config.task != pb.TASK_TYPE_UNSPECIFIED:
            return None
        return (
            f"windowkv task unset (no hint, no classifier result): falling back to {pb.TaskType.Name(self.task)} "
            f"({self.suffix}-token observation suffix, {SCORE_MODE[self.task]} window scores)"
        )

    def _plan_budget(self) -> int:
        """The mean budget the working set must hold (with budget_fraction: for max_tokens)."""
        if self.config.budget_fraction is None:
            return self.config.budget
        return max(1, math.ceil(self.config.budget_fraction * self.layout.max_tokens))

    def _layer_budgets(self, budget: int) -> list[int]:
        c, L = self.config, self.layout.num_layers
        if c.variant == "paper":
            return paper_layer_budgets(L, c.group_size, budget)
        return layer_budgets(L, c.group_size, budget, c.decay)

    def plan(self) -> WorkingSetPlan:
        c = self.config
        widest = max(self._layer_budgets(self._plan_budget()))
        widest = min(widest, self.layout.max_tokens)  # no layer can keep more tokens than exist
        # The suffix tokens the window ring does not hold must fit in the retrieved region.
        outside_ring = max(0, self.suffix - (c.window - DEFAULT_SPILL_EVERY))
        # the reference's window count may overshoot the budget by a short last window
        overshoot = c.window_size - 1 if c.variant == "paper" else 0
        return WorkingSetPlan(
            n_sink=c.n_sink,
            retrieved=max(min(widest + overshoot, self.layout.max_tokens), outside_ring),
            window=c.window,
            spill_every=DEFAULT_SPILL_EVERY,
        )

    def boundary_rule(self) -> BoundaryRule:
        if self.config.keep_pruned_in_host:
            return BoundaryRule(pb.BOUNDARY_MODE_THRESHOLD, self.config.threshold)
        return BoundaryRule()

    def observation(self) -> int:
        return self.suffix

    @property
    def num_units(self) -> int:
        return 0 if self.recall is None else self.recall.num_units

    def metadata_bytes(self) -> int:
        return 0 if self.recall is None else self.recall.metadata_bytes()

    def on_ingest_layer(self, ctx: PolicyContext, layer: int, kv: torch.Tensor, queries: torch.Tensor | None) -> None:
        c, L = self.config, self.layout.num_layers
        if layer == 0:
            self._start_ingest(ctx)
        if self.recall is not None:
            self.recall.on_ingest_layer(ctx, layer, kv, None)  # clusters the prompt; selects nothing yet
        start, end = ctx.ingest_range
        if queries is None or end <= start:
            return
        first = layer - layer % c.group_size
        last = min(L, first + c.group_size) - 1
        observed = queries[:, -self.suffix :].to(kv.device)
        if c.variant == "paper":
            if layer == first:  # the group's first layer selects, from every query head's own mass
                self.votes = observation_scores(observed, kv[0].repeat_interleave(self.layout.group_size, 0), 1)
        elif c.group_select == "sum" or layer == first:  # every layer of the group votes, equally
            mass = observation_scores(observed, kv[0], self.layout.group_size)
            self.votes = mass if self.votes is None else self.votes + mass
        if layer == last:
            self._select_group(ctx, first, last + 1, self.votes)
            self.votes = None

    def _start_ingest(self, ctx: PolicyContext) -> None:
        """Per-layer budgets for this prompt, an empty selection, and the recall policy."""
        c, T, R = self.config, ctx.prompt_tokens, ctx.ws.plan.retrieved
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        budget = c.budget if c.budget_fraction is None else max(1, round(c.budget_fraction * T))
        self.budgets = [min(b, R) for b in self._layer_budgets(budget)]
        self.selection = torch.full((L, H, R), -1, dtype=torch.int64)
        self.kept, self.votes = 0, None
        if c.keep_pruned_in_host:
            self.recall = LouisKVPolicy(
                LouisKVConfig(budget=min(budget, R), n_sink=c.n_sink, window=c.window, threshold=c.threshold),
                self.layout,
            )

    def on_ingest_done(self, ctx: PolicyContext) -> Selection | None:
        if self.recall is not None:
            self.recall.on_ingest_done(ctx)
        if self.kept == 0 and bool((self.selection < 0).all()):
            return None
        return Selection(self.selection, units=self.kept)

    def _select_group(self, ctx: PolicyContext, first: int, stop: int, mass: torch.Tensor) -> None:
        """Layers [first, stop) keep the windows their votes mass (tuned: [H, T] per KV head;
        paper: [Hq, T] per query head, one choice for all heads) rank best, among the prompt
        tokens outside sinks and ring; the suffix is always kept."""
        start, end = ctx.ingest_range
        H, R = self.layout.num_kv_heads, ctx.ws.plan.retrieved
        cut = max(start, min(end, ctx.prompt_tokens - self.suffix))  # suffix tokens from `cut` on are kept
        positions = torch.arange(start, end, dtype=torch.int64, device=mass.device).expand(H, -1)
        suffix = torch.ones(H, end - cut, dtype=torch.bool, device=mass.device)
        budget, size, mode = self.budgets[first] - (end - cut), self.config.window_size, SCORE_MODE[self.task]
        if self.config.variant == "paper":
            chosen = paper_select(mass[:, start:cut], budget, size, mode).expand(H, -1)
        else:
            chosen = select_windows(mass[:, start:cut], budget, size, mode)
        picked = compact(torch.cat((chosen, suffix), dim=1), positions, R).cpu()
        self.selection[first:stop] = picked
        self.kept += int((picked >= 0).sum()) * (stop - first)

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        if self.recall is not None:
            return self.recall.on_evict(ctx, start, end)
        return fill_free_slots(ctx, start, end)

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        if self.recall is None:
            return None
        L = self.layout.num_layers
        recalled = self.recall.on_boundary(ctx, query, list(range(L)))
        if recalled is None:
            return None
        current = ctx.ws.retrieved_positions().cpu()
        width = current.shape[-1]
        new = recalled.positions.cpu()  # [L, H, budget], budget <= width
        if new.shape[-1] < width:
            new = torch.cat(
                (new, torch.full((*new.shape[:2], width - new.shape[-1]), -1, dtype=new.dtype)), dim=-1
            )
        index = torch.tensor(layers, dtype=torch.int64)
        current[index] = new[index]
        return Selection(current, units=recalled.units)
