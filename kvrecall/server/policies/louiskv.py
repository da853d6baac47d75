"""`louiskv` — semantic-boundary KV retrieval (LouisKV, ICLR 2026, arXiv 2510.11292).

* Prompt: per (layer, KV head), the keys that left the window at ingest are clustered by
  k-means into units of ~`cluster_size` tokens; a unit's representative is its centroid.
* Output: tokens leaving the window join an open *segment*; a segment closes at a boundary
  (or at `max_segment` tokens) and its representative is the mean of its keys.
* Chunks (several tokens in one forward pass after the ingest): the tokens that leave the
  window without entering the ring are clustered like the prompt, with the open segment.
* Ingest (`ingest_select="tokens"`): the first selection takes single prompt tokens by the
  attention the last `observation` prompt queries pay them (SnapKV's vote, max-pooled; with
  `ingest_span` the best quarter bring their neighbours, as at a chunk); the best `pin_ingest`
  fraction of the budget of them stays pinned through later retrievals.
* Chunk (`chunk_select="tokens"`): the retrieval a chunk's last queries ask for before it
  attends (a question after a cached document) takes single tokens by the attention those
  queries pay every token that left the window before it (the ingest's vote, question-aware
  now), and its best `pin_ingest` fraction replaces the pinned set: the ingest chose it without
  the question.
* Boundary (the worker saw its query drift below `threshold`): the query [L, Hq, D] scores
  every unit per KV head (grouped query heads aggregated by `aggregate`), the best units fill
  the unpinned part of `budget` (the last one partially; a row whose units all fit takes them
  all), and the working set keeps what is already resident and gathers the rest from the
  host tier.
* Between boundaries nothing is retrieved; while the retrieved region has free slots the
  tokens leaving the window fill them (so budget >= sequence length is exact).

Shapes: B = L * H problems; units [B, U, D] (prompt and chunk clusters, segments); selection [L, H, R].
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from kvrecall import captured, kernels
from kvrecall.server.layout import MappedTable, WorkingSetPlan
from kvrecall.server.policies.base import (
    DEFAULT_SPILL_EVERY,
    BoundaryRule,
    Policy,
    PolicyContext,
    Selection,
    check,
    check_resident,
    fill_free_slots,
    fill_free_slots_many,
    register,
    resident_plan,
)
from kvrecall.server.policies.snapkv import ObservationRanking, ascending, ranked_selection, top_voted
from kvrecall.server.streams import retire
from kvrecall.server.working_set import to_device
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.louiskv")

POOL_KERNEL = 7  # max-pool width of the token votes at ingest (SnapKV's)
SPAN_SEEDS = 0.25  # chunk_span > 0: the budget fraction of a chunk's best-voted tokens that bring their neighbours


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
    chunk_select: str = "tokens"  # a chunk's retrieval: "tokens" (its queries' attention, re-pinned) or "units"
    aggregate: str = "max"  # grouped query heads: "max" or "sum" of unit scores
    pin_ingest: float = 0.25  # budget fraction keeping the best ingest tokens through retrievals
    target_rate: float = 0.0  # > 0: the worker's threshold adapts to retrieve on this share of steps
    min_gap: int = 8  # decode steps after a retrieval (the prompt's, a chunk's, a boundary's) with no boundary
    chunk_votes: int = 4  # a chunk's last queries voting its retrieval (0: every one the worker sent)
    chunk_span: int = 8  # > 0: a chunk's best-voted SPAN_SEEDS of tokens bring their +-chunk_span neighbours
    exact_chunks: bool = True  # a chunk attends exactly over every earlier token (the host tier), not the working set
    ingest_span: int = 8  # > 0: the ingest's best-voted SPAN_SEEDS of tokens bring their +-ingest_span neighbours
    observation_vote: str = "scales"  # the ingest's vote: "scales" (the last 4, 8, 16 queries' mean votes summed) or "flat"

    def __post_init__(self) -> None:
        check_resident(self)
        check(1 <= self.cluster_size <= 4096, "cluster_size", "must be in [1, 4096]")
        check(0 <= self.kmeans_iters <= 100, "kmeans_iters", "must be in [0, 100]")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1]")
        check(1 <= self.max_segment <= 1 << 16, "max_segment", "must be in [1, 65536]")
        check(self.aggregate in ("max", "sum"), "aggregate", "must be 'max' or 'sum'")
        check(1 <= self.observation <= 256, "observation", "must be in [1, 256]")
        check(self.ingest_select in ("tokens", "units"), "ingest_select", "must be 'tokens' or 'units'")
        check(self.chunk_select in ("tokens", "units"), "chunk_select", "must be 'tokens' or 'units'")
        check(0.0 <= self.pin_ingest <= 1.0, "pin_ingest", "must be in [0, 1]")
        check(0.0 <= self.target_rate < 1.0, "target_rate", "must be in [0, 1) (0: the fixed threshold)")
        check(0 <= self.min_gap <= 1 << 16, "min_gap", "must be in [0, 65536] (0: the rule may fire at any step)")
        check(0 <= self.chunk_votes <= 4096, "chunk_votes", "must be in [0, 4096] (0: every query the worker sent)")
        check(0 <= self.chunk_span <= 256, "chunk_span", "must be in [0, 256] (0: single tokens)")
        check(0 <= self.ingest_span <= 256, "ingest_span", "must be in [0, 256] (0: single tokens)")
        check(self.observation_vote in ("flat", "scales"), "observation_vote", "must be 'flat' or 'scales'")

    @property
    def pinned_tokens(self) -> int:
        """Retrieved slots held by the best tokens of the last token selection (at ingest or at a
        chunk, whichever selects tokens)."""
        by_tokens = "tokens" in (self.ingest_select, self.chunk_select)
        return round(self.pin_ingest * self.budget) if by_tokens else 0


class _UnitTable:
    """Every retrieval unit of one session on the device, prompt clusters first, then chunk
    clusters and closed output segments, so a boundary reads them as views (no concatenation,
    no host data). Allocated once at its capacity (what metadata_bytes reserves).

    Per unit: reps [B, U, D] (the layout dtype when 16-bit, else f32), sizes [B, U] int32 and
    valid (size > 0). Per candidate token: position [B, M] int32, grouped by unit in unit order
    (unit u's sizes[u] candidates follow those of units < u), so a candidate's unit and rank
    follow from prefix sums of sizes (kernels.expand_grouped) and are not stored.

    Over a shared prefix (`base`: the prefix template's table, read-only, never written here)
    the table holds only what comes after it: units [base.num_units, ...) and candidates
    [base.num_tokens, ...) in its own tensors. view() and field() read base and own columns
    together, as one table would hold them."""

    def __init__(
        self, rows: int, units: int, tokens: int, dim: int, rep_dtype: torch.dtype, device,
        base: _UnitTable | None = None, storage: dict[str, torch.Tensor] | None = None,
    ) -> None:  # fmt: skip
        """`storage`: zeroed reps, sizes and position of these shapes to hold the table in (the
        working-set segment's, which the worker maps: WorkingSet.table_fields)."""
        self.base = base
        self.first_unit = 0 if base is None else base.num_units  # columns the base holds
        self.first_token = 0 if base is None else base.num_tokens
        held = storage or {}

        def field(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return held[name] if name in held else torch.zeros(shape, dtype=dtype, device=device)

        self.reps = field("reps", (rows, units, dim), rep_dtype)
        self.sizes = field("sizes", (rows, units), torch.int32)
        self.valid = torch.zeros(rows, units, dtype=torch.bool, device=device)  # (= sizes > 0)
        # Unfilled units have size 0 (and are invalid), so the candidate columns past the filled
        # ones belong to no unit: a selection may read them (a captured one reads whole buckets).
        self.position = field("position", (rows, tokens), torch.int32)
        self.num_units = self.first_unit  # filled unit columns, the base's included
        self.num_tokens = self.first_token  # filled candidate columns, the base's included
        self.mirror = None  # its host copy, where the daemon selects on the host (server/host_selection.py)

    @staticmethod
    def nbytes(rows: int, units: int, tokens: int, dim: int, rep_dtype: torch.dtype) -> int:
        """Bytes of `rows` x `units` units (rep, int32 size, bool valid) and `tokens` candidates
        (int32 position)."""
        rep = torch.empty((), dtype=rep_dtype).element_size()
        return rows * (units * (dim * rep + 4 + 1) + tokens * 4)

    @property
    def filled_nbytes(self) -> int:
        """Bytes of the filled columns (the base's included): what stacking this table copies."""
        return self.nbytes(self.reps.shape[0], self.num_units, self.num_tokens, self.reps.shape[2], self.reps.dtype)

    @property
    def room(self) -> int:
        """Units that still fit."""
        return self.rest()[0]

    @property
    def own_units(self) -> int:
        """Filled columns of this table's own unit tensors."""
        return self.num_units - self.first_unit

    @property
    def own_tokens(self) -> int:
        return self.num_tokens - self.first_token

    def put(self, rows: slice, reps: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor) -> None:
        """Write units [num_units, + u) and candidates [num_tokens, + m) of `rows` (position:
        grouped by the new units, sizes summing to m per row); advance() makes them visible."""
        u, m = sizes.shape[1], position.shape[1]
        U, M = self.own_units, self.own_tokens
        # (the assignment casts to a 16-bit or f32 table itself; fp8 needs to_reps' clamp first)
        self.reps[rows, U : U + u] = to_reps(reps, FP8) if self.reps.dtype == FP8 else reps
        self.sizes[rows, U : U + u] = sizes
        self.valid[rows, U : U + u] = sizes > 0
        self.position[rows, M : M + m] = position

    def advance(self, units: int, tokens: int) -> None:
        self.num_units += units
        self.num_tokens += tokens

    def view(self, name: str) -> torch.Tensor:
        """Field `name` over the filled columns (base and own: a copy over a base)."""
        return self.field(name, self.num_units if name in UNIT_COLUMNS else self.num_tokens)

    def field(self, name: str, width: int) -> torch.Tensor:
        """Field `name`'s first `width` columns (>= the base's; columns past the filled ones
        are empty units, or candidates of no unit)."""
        own = getattr(self, name)[:, : width - (self.first_unit if name in UNIT_COLUMNS else self.first_token)]
        if self.base is None:
            return own
        return torch.cat((self.base.view(name), own), dim=1)

    def segments(self) -> list[tuple[torch.Tensor, ...]]:
        """UNIT_FIELDS over the filled columns, one tuple per table of the chain (the base's
        first): views, no copies. Concatenated column-wise they are view()'s fields; over a shared
        prefix a selection reads them apart (choose_units_split) instead of copying the prefix's
        table (~0.6 GB at 128K tokens of a Llama-3-8B shape) at every retrieval."""
        own = tuple(getattr(self, name)[:, : self.own_units if name in UNIT_COLUMNS else self.own_tokens]
                    for name in UNIT_FIELDS)  # fmt: skip
        return ([] if self.base is None else self.base.segments()) + [own]

    def rest(self) -> tuple[int, int]:
        """(units, candidate tokens) per row this table still has room for."""
        return self.sizes.shape[1] - self.own_units, self.position.shape[1] - self.own_tokens

    def extend(self) -> _UnitTable:
        """An empty table after this one (its base): what a session over a shared prefix adds."""
        rows, _, dim = self.reps.shape
        return _UnitTable(rows, *self.rest(), dim, self.reps.dtype, self.reps.device, base=self)


UNIT_COLUMNS = ("reps", "sizes", "valid")  # the fields with a column per unit (the rest: per candidate)

_select_first = False  # the daemon's select_before_close (a diagnostic): configure()
_fp8_reps = False  # the daemon's unit_reps_dtype is "fp8": configure()
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value


def configure(select_before_close: bool, unit_reps_dtype: str = "layout") -> None:
    """The daemon's `select_before_close`: a boundary selects over the table as the notices left
    it, then closes the open segment (its tokens are candidates from the next boundary on). Its
    `unit_reps_dtype`: "layout", tables made from now on hold their representatives in the
    layout's 16-bit dtype (else f32); "fp8", in float8 e4m3 (see rep_dtype)."""
    global _select_first, _fp8_reps
    if unit_reps_dtype not in ("layout", "fp8"):
        raise ValueError(f"unit_reps_dtype: {unit_reps_dtype!r} is neither 'layout' nor 'fp8'")
    _select_first = bool(select_before_close)
    _fp8_reps = unit_reps_dtype == "fp8"


def rep_dtype(layout_dtype: torch.dtype) -> torch.dtype:
    """The dtype a unit table of this layout stores its representatives in: float8 e4m3 under
    the daemon's unit_reps_dtype fp8 (half the bytes of 16 bits: a score reads the whole table,
    and only a row's order of scores matters, which e4m3's 3 mantissa bits kept on the bundled
    model, docs/TUNING.md), else the layout's dtype when 16-bit, else float32."""
    if _fp8_reps:
        return FP8
    return layout_dtype if layout_dtype in (torch.float16, torch.bfloat16) else torch.float32


def to_reps(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Representatives (any float dtype) as a table of `dtype` stores them: to float8 e4m3
    through float32 clamped to +-448 (a CPU cast makes NaN of what e4m3 cannot hold, the GPU's
    saturates: both stores now hold the same value), else a plain cast."""
    if dtype == FP8:
        return values.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values.to(dtype)


def selects_first() -> bool:
    return _select_first

UNIT_BUCKET = 64  # a captured selection reads unit columns in buckets of this many ...
TOKEN_BUCKET = 1024  # ... and candidate columns in these: re-captured when the table outgrows them


def bucket_widths(table: _UnitTable) -> tuple[int, int]:
    """(unit, candidate) columns a captured selection reads: the filled ones rounded up to
    whole buckets, at most the table's capacity."""
    units, tokens = table.sizes.shape[1], table.position.shape[1]
    return (
        min(units, -(-table.num_units // UNIT_BUCKET) * UNIT_BUCKET),
        min(tokens, -(-table.num_tokens // TOKEN_BUCKET) * TOKEN_BUCKET),
    )


# Prompt tokens per k-means segment at ingest (see cluster_segments).
PROMPT_SEGMENT = 8192


def cluster_pieces(keys: torch.Tensor, k: int, iters: int, first: int) -> tuple[torch.Tensor, ...]:
    """k-means of keys [B, N, D] (token 0 = position `first`) into k clusters per row ->
    (centroids [B, k, D] f32, sizes [B, k], positions [B, N]), the positions grouped by
    cluster in cluster order (a unit table's candidates), ascending within each."""
    centroids, assign, counts = kernels.kmeans(keys, k, iters)
    order = torch.sort(assign, dim=1, stable=True).indices
    return centroids, counts, order + first


def cluster_segments(
    keys: torch.Tensor, cluster_size: int, iters: int, first: int, segment: int = PROMPT_SEGMENT
) -> tuple[torch.Tensor, ...]:
    """cluster_pieces of a prompt's keys [B, N, D] into ceil(N / cluster_size) clusters per row,
    k-means run within consecutive segments of `segment` tokens (rounded down to a multiple of
    cluster_size; the segments of all rows in one batched call, the remainder in a second), so
    the work grows with N rather than N^2 (k-means over N points into N / cluster_size clusters)
    and one layer's clustering keeps up with the layer's prefill."""
    B, N, D = keys.shape
    per = max(1, segment // cluster_size) * cluster_size
    if N <= per:
        return cluster_pieces(keys, max(1, math.ceil(N / cluster_size)), iters, first)
    n_full, k_full = N // per, per // cluster_size
    centroids, sizes, position = cluster_pieces(keys[:, : n_full * per].reshape(B * n_full, per, D), k_full, iters, 0)
    segment_index = torch.arange(n_full, device=keys.device)[None, :, None]
    parts = [(
        centroids.reshape(B, n_full * k_full, D),
        sizes.reshape(B, n_full * k_full),
        (position.view(B, n_full, per) + segment_index * per).reshape(B, -1) + first,
    )]  # fmt: skip
    rest = N - n_full * per
    if rest:
        parts.append(cluster_pieces(keys[:, n_full * per :], math.ceil(rest / cluster_size), iters, first + n_full * per))
    return tuple(torch.cat(columns, dim=1) for columns in zip(*parts, strict=True))


@register
class LouisKVPolicy(Policy):
    name = "louiskv"
    proto_field = "louiskv"
    Config = LouisKVConfig

    def __init__(self, config: LouisKVConfig, layout) -> None:
        super().__init__(config, layout)
        self.units: _UnitTable | None = None
        self.prompt_units = 0  # non-empty prompt and chunk clusters over all rows
        self.seg_bounds: list[tuple[int, int]] = []
        self.open_start = 0  # first token of the open output segment
        self.closed_upto = 0  # tokens [prompt_evicted, closed_upto) are in closed units
        self.open_sum: torch.Tensor | None = None  # [B, D] f32: keys of the open segment, summed
        self.pinned: torch.Tensor | None = None  # [B, P] ascending, -1 padded: kept by every retrieval
        # The working-set segment's unit table fields, where the worker maps them (map_table).
        self.mapped: dict[str, torch.Tensor] | None = None
        self.ranking = ObservationRanking(
            layout.num_layers, layout.num_kv_heads, config.budget, POOL_KERNEL, config.observation_vote
        )
        self.observed: list[torch.Tensor] = []  # ingest_select="units": each layer's observation queries
        self._capacity_warned = False
        self._captured = captured.CapturedCall()  # the boundary selection as a CUDA graph (capture_selection)

    def plan(self) -> WorkingSetPlan:
        return resident_plan(self.config)

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule(pb.BOUNDARY_MODE_THRESHOLD, self.config.threshold, self.config.pre_rope)

    def observation(self) -> int:
        return self.config.observation

    @property
    def num_units(self) -> int:
        return self.prompt_units + len(self.seg_bounds) * self.layout.num_layers * self.layout.num_kv_heads

    # ---- device metadata ---------------------------------------------------------------
    def _table_shape(self) -> tuple[int, int, torch.dtype]:
        """(units, candidate tokens, rep dtype) per row. A unit holds `unit_min` tokens or more
        on average (k-means makes ceil(N / cluster_size) clusters of a prompt and
        N // cluster_size of a chunk; a decode segment grows by spill_every tokens per notice
        and closes at a boundary or at max_segment); the table is allocated at this size once
        and a segment that would not fit stays open (_close_segment)."""
        T = self.layout.max_tokens
        unit_min = max(1, min(self.config.cluster_size, DEFAULT_SPILL_EVERY, self.config.max_segment))
        return -(-T // unit_min) + 2, T, rep_dtype(self.layout.dtype)

    def metadata_bytes(self) -> int:
        return self._metadata_bytes(*self._table_shape())

    # ---- a table the worker maps (the daemon's worker_selection) ---------------------------
    def mapped_table(self) -> MappedTable:
        """The shape of this policy's unit table held in the working-set segment."""
        units, tokens, dtype = self._table_shape()
        return MappedTable(units, tokens, dtype, self.config.pinned_tokens, self.config.aggregate)

    def mapped_metadata_bytes(self) -> int:
        """metadata_bytes less what the segment holds with a mapped table (reps, sizes,
        positions, pinned tokens, a copy of the open segment's sum): the valid flags and
        the open sum itself."""
        units, _, _ = self._table_shape()
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        return L * H * units + L * H * D * 4

    def map_table(self, fields: dict[str, torch.Tensor]) -> None:
        """Hold the unit table and pinned tokens in `fields` (WorkingSet.table_fields), before
        the ingest creates them."""
        self.mapped = fields

    def _set_pinned(self, pinned: torch.Tensor) -> None:
        """The pinned tokens [B, P] int64 (in the mapped field where the table is mapped)."""
        if self.mapped is not None and "pinned" in self.mapped:
            self.mapped["pinned"].copy_(pinned)
            self.pinned = self.mapped["pinned"]
        else:
            self.pinned = pinned

    def _metadata_bytes(self, units: int, tokens: int, dtype: torch.dtype) -> int:
        """A unit table of `units` x `tokens` per row plus the state beside it (the open
        segment's sum, the pinned tokens)."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        pinned = L * H * self.config.pinned_tokens * 8
        return _UnitTable.nbytes(L * H, units, tokens, D, dtype) + L * H * D * 4 + pinned

    def template(self) -> LouisKVPolicy:
        """A copy whose table keeps its base chain shared: over a held prefix the session's own
        table extends the prefix's (read-only, kept alive by the new prefix's reference to it)."""
        if self.mapped is not None:  # (its fields are views of a working-set segment: SessionRegistry never maps one)
            raise RuntimeError("a louiskv policy whose table is mapped into its working set is never a prefix template")
        memo: dict[int, object] = {}
        table = self.units.base if self.units is not None else None
        while table is not None:
            memo[id(table)] = table
            table = table.base
        return copy.deepcopy(self, memo)

    def derive(self) -> LouisKVPolicy:
        """A session over a held prefix shares the template's unit table read-only (prompt and
        chunk clusters) and adds its own units (chunks, output segments) in a table of its own."""
        if self.units is None:
            return copy.deepcopy(self)
        clone = copy.deepcopy(self, {id(self.units): None})
        clone.units = self.units.extend()
        return clone

    def derived_metadata_bytes(self) -> int:
        if self.units is None:
            return self.metadata_bytes()
        return self._metadata_bytes(*self.units.rest(), self.units.reps.dtype)

    def _table(self, device) -> _UnitTable:
        if self.units is None:
            units, tokens, dtype = self._table_shape()
            L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
            self.units = _UnitTable(L * H, units, tokens, D, dtype, device, storage=self.mapped)
        return self.units

    # ---- hooks ------------------------------------------------------------------------
    def on_ingest_layer(self, ctx: PolicyContext, layer: int, kv: torch.Tensor, queries: torch.Tensor | None) -> None:
        start, end = ctx.ingest_range
        device = ctx.ws.keys.device
        keys = kv[0].to(device)  # [H, T, D]
        if end > start:
            H = self.layout.num_kv_heads
            centroids, sizes, position = cluster_segments(
                keys[:, start:end], self.config.cluster_size, self.config.kmeans_iters, start
            )
            rows = slice(layer * H, (layer + 1) * H)
            self._table(device).put(rows, centroids, sizes, position)
            self.prompt_units += int((sizes > 0).sum())
        if queries is None:
            return
        obs = queries[:, -self.config.observation :]
        if self.config.ingest_select == "tokens":
            self.ranking.rank_layer(ctx, layer, keys, obs)
            if self.config.ingest_span and end > start:
                # As at a chunk: the best votes bring their sentence whole (with_spans).
                count = min(self.config.budget, end - start)
                top = self.ranking.ranked[layer, :, :count]
                self.ranking.ranked[layer, :, :count] = spread(top, self.config.ingest_span, (start, end))
        else:
            self.observed.append(obs)

    def on_ingest_done(self, ctx: PolicyContext) -> Selection | None:
        start, end = ctx.ingest_range
        self.open_start = self.closed_upto = ctx.evicted_upto  # later evictions start there
        if self.units is not None and end > start:
            k = max(1, math.ceil((end - start) / self.config.cluster_size))
            self.units.advance(min(k, end - start), end - start)
        if self.config.ingest_select == "tokens":
            # The prompt's keys were at hand layer by layer: the first retrieval takes single
            # tokens by the attention the last prompt queries pay them (SnapKV's vote); units
            # serve later, next to the best `pinned_tokens` of them, which every retrieval keeps.
            if not self.ranking.any:
                return None
            ranked = self.ranking.ranked
            pinned = self.config.pinned_tokens
            if pinned:
                rows = ascending(ranked[:, :, :pinned]).view(-1, pinned)
                self._set_pinned(to_device(rows, ctx.ws.keys.device))
            return ranked_selection(ranked)
        if len(self.observed) < self.layout.num_layers:
            return None
        # Or every unit scored by those queries, the best over them (as over a group's heads).
        obs = torch.stack(self.observed).to(ctx.ws.keys.device)
        self.observed = []
        return self._select(ctx, obs, list(range(self.layout.num_layers)))

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        if ctx.chunk is not None and start >= ctx.chunk.start:
            self._absorb_chunk(ctx, start, end)
        else:
            # The evicted tokens are still in the ring: their keys join the open segment's sum.
            for lo, hi in ctx.ws.ring_spans(start, end):
                self._add_to_open(ctx.ws.keys[:, :, lo:hi])
            if end - self.open_start >= self.config.max_segment:
                self._close_segment(ctx, end)
        publish_open([self])
        return fill_free_slots(ctx, start, end)

    wants_evicted_sums = True

    @classmethod
    def on_evict_many(cls, items) -> list[Selection | None]:
        """on_evict of several sessions (Policy.on_evict_many): the keys that left each ring,
        summed by the notice's launch, join the open segments in one op; the segments that
        reached max_segment close in one launch (close_segments)."""
        selections: list[Selection | None] = [None] * len(items)
        ring = []
        for i, (policy, ctx, start, end, sums) in enumerate(items):
            if sums is None or (ctx.chunk is not None and start >= ctx.chunk.start):
                selections[i] = policy.on_evict(ctx, start, end)
            else:
                ring.append(i)
        if ring:
            adding = [items[i] for i in ring if items[i][0].open_sum is not None]
            if adding:
                torch._foreach_add_([item[0].open_sum for item in adding], [item[4] for item in adding])
            opening: dict[tuple, list] = {}  # by shape: one copy each (no open_sum keeps the call's buffer)
            for i in ring:
                if items[i][0].open_sum is None:
                    opening.setdefault(tuple(items[i][4].shape), []).append(items[i])
            for group in opening.values():
                for item, part in zip(group, torch.stack([item[4] for item in group]), strict=True):
                    item[0].open_sum = part
            close_segments([(items[i][0], items[i][3]) for i in ring
                            if items[i][3] - items[i][0].open_start >= items[i][0].config.max_segment])  # fmt: skip
            publish_open([items[i][0] for i in ring])
            filled = fill_free_slots_many([(items[i][1], items[i][2], items[i][3]) for i in ring])
            for i, selection in zip(ring, filled, strict=True):
                selections[i] = selection
        return selections

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        if not _select_first:
            self._close_segment(ctx, ctx.evicted_upto)
        query = query.to(ctx.ws.keys.device)
        if query.dim() == 4 and self.config.chunk_select == "tokens":  # a chunk's last queries
            selection = self._select_tokens(ctx, query, layers)
        else:
            selection = self._select(ctx, query, layers)
        if _select_first:
            self._close_segment(ctx, ctx.evicted_upto)
        return selection

    # ---- units --------------------------------------------------------------------------
    def _add_to_open(self, keys: torch.Tensor) -> None:
        """keys [L, H, n, D] join the open segment."""
        part = keys.sum(dim=2, dtype=torch.float32).view(-1, self.layout.head_dim)
        retire(self.open_sum)  # replaced: the sum below reads it (server/streams.py)
        self.open_sum = part if self.open_sum is None else self.open_sum + part

    def _absorb_chunk(self, ctx: PolicyContext, start: int, end: int) -> None:
        """Chunk tokens [start, end) left the window without entering the ring. A chunk is
        prompt-like text (a question, the rest of a long prompt) whose important keys are
        scattered, so it is clustered like the prompt (LouisKV's input rule), together with
        the open segment; fewer than cluster_size tokens join the open segment instead."""
        device = ctx.ws.keys.device
        keys = ctx.chunk.keys(start, end).to(device)  # [L, H, n, D]
        first = self.open_start
        count = end - first
        k = min(count // self.config.cluster_size, self._table(device).room)
        if k == 0:
            self._add_to_open(keys)
            return
        if first < start:  # the open segment's tokens (in the host tier) join the clustering
            L = self.layout.num_layers
            held = torch.stack([ctx.store.keys(layer, first, start) for layer in range(L)]).to(device)
            keys = torch.cat((held, keys), dim=2)
        L, H, N, D = keys.shape
        centroids, sizes, position = cluster_pieces(keys.reshape(L * H, N, D), k, self.config.kmeans_iters, first)
        self.units.put(slice(None), centroids, sizes, position)
        self.units.advance(k, N)
        self.prompt_units += int((sizes > 0).sum())
        self.open_start = self.closed_upto = end
        retire(self.open_sum)
        self.open_sum = None

    def _close_segment(self, ctx: PolicyContext, end: int) -> None:
        close_segments([(self, end)])

    def _select_tokens(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        """query [L, Hq, n, D] (a chunk's last n queries per head, rows of `layers`) -> the
        `budget` single tokens of those that left the window before the chunk receiving the
        most attention from its last `observation` queries (over every token before the
        chunk, max-pooled: the ingest's vote), for `layers`; their best
        `pinned_tokens` become those rows' pinned set. A question asked after its document
        names what the answer needs; the ingest's vote could not, and clusters blur a needle
        into its neighbours' centroid (docs/TUNING.md, document first)."""
        first, end = min(ctx.ws.plan.n_sink, ctx.prompt_tokens), ctx.evicted_upto
        if end <= first:
            return None
        current = ctx.ws.retrieved_positions()  # [L, H, R], a copy
        L, H, R = current.shape
        device = current.device
        count, P = min(R, end - first), self.config.pinned_tokens
        if P and self.pinned is None:
            self._set_pinned(torch.full((L * H, P), -1, dtype=torch.int64, device=device))
        for layer in layers:
            keys = ctx.store.keys(layer, 0, ctx.store.num_tokens).to(device)  # [H, T, D], the ring's too
            votes = query[layer][:, -self.config.chunk_votes :]  # the last queries (0: all)
            top = top_voted(votes, keys, self.layout.group_size, (first, end), count, POOL_KERNEL, causal=False)
            if self.config.chunk_span:
                top = spread(top, self.config.chunk_span, (first, end))
            row = torch.full((H, R), -1, dtype=torch.int64, device=device)
            row[:, :count] = top
            current[layer] = ascending(row)
            if P:
                self.pinned[layer * H : (layer + 1) * H] = ascending(row[:, :P])
        return Selection(current, units=len(layers) * H * count)

    def _select(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection:
        """query [L, Hq, D] or [L, Hq, n, D] (n queries per head) -> the retrieved positions
        [L, H, R] for `layers` (others kept; only their rows are scored).

        All on the device, no host sync: the number of units chosen stays a device scalar."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        R = self.config.budget
        table = self.units
        if table is None or table.num_units == 0:
            return Selection(ctx.ws.retrieved_positions())
        if len(layers) == L:
            return self._choose_every_layer(query)
        device = table.reps.device
        index = to_device(torch.tensor(layers), device)
        rows = (index[:, None] * H + torch.arange(H, device=device)).view(-1)
        q = query[index].reshape(len(layers) * H, -1, D)  # its own dtype: scored in f32
        new, take = choose_units_split(
            q, [tuple(field[rows] for field in segment) for segment in table.segments()],
            None if self.pinned is None else self.pinned[rows], R, self.config.aggregate,
        )  # fmt: skip
        units = (take > 0).sum()
        current = ctx.ws.retrieved_positions().view(L * H, R)
        current[rows] = new
        return Selection(current.view(L, H, R), units=units)

    def _choose_every_layer(self, query: torch.Tensor) -> Selection:
        """Every layer's retrieval on views of this session's own table (no copies unless the
        table is chained to a prefix's): query [L, Hq, D] or [L, Hq, n, D]. With the daemon's
        `capture_selection` a boundary's query over a table of its own is one CUDA graph
        (_choose_captured)."""
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        R = self.config.budget
        if query.dim() == 3 and self.units.base is None and captured.enabled(query.device):
            return self._choose_captured(query.reshape(L * H, -1, D))
        new, take = choose_units_split(
            query.reshape(L * H, -1, D), self.units.segments(), self.pinned, R, self.config.aggregate
        )
        return Selection(new.view(L, H, R), units=(take > 0).sum())

    def _choose_captured(self, q: torch.Tensor) -> Selection:
        """choose_units over the table's filled columns rounded up to whole buckets (columns
        past the filled ones are invalid units of size 0 and candidates of no unit, never
        chosen: the same selection), replayed as one CUDA graph until the table outgrows its
        buckets (kvrecall/captured.py)."""
        L, H = self.layout.num_layers, self.layout.num_kv_heads
        R, aggregate, table = self.config.budget, self.config.aggregate, self.units
        widths = bucket_widths(table)
        fields = [table.field(name, widths[0 if name in UNIT_COLUMNS else 1]) for name in UNIT_FIELDS]
        pinned = () if self.pinned is None else (self.pinned,)
        key = (widths, table.reps.data_ptr(), tuple(q.shape), q.dtype, tuple(p.shape for p in pinned))

        def choose(query: torch.Tensor, *held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new, take = choose_units(query, *fields, held[0] if held else None, R, aggregate)
            return new, (take > 0).sum()

        new, units = self._captured(key, choose, (q, *pinned))
        return Selection(new.view(L, H, R), units=units)

    # ---- several sessions at once (a Boundaries call) ------------------------------------
    def batch_key(self) -> tuple:
        """Same layout and settings (so the same table shapes) and the same pinned width."""
        return self.layout, dataclasses.astuple(self.config), None if self.pinned is None else self.pinned.shape[1]

    @classmethod
    def on_boundaries(cls, items: list[tuple[Policy, PolicyContext, torch.Tensor]]) -> list[Selection | None]:
        """Each session closes its open segment; then the sessions with units are scored,
        selected and expanded together over their stacked tables (select_together)."""
        out: list[Selection | None] = []
        together = []
        closing = [(policy, ctx.evicted_upto) for policy, ctx, _ in items]
        if not _select_first:
            close_segments(closing)
        for policy, ctx, query in items:
            table = policy.units
            if table is None or table.num_units == 0:
                out.append(Selection(ctx.ws.retrieved_positions()))
            else:
                out.append(None)
                together.append((len(out) - 1, policy, query.to(table.reps.device)))
        if together:
            chosen = select_together([policy for _, policy, _ in together], [query for _, _, query in together])
            for (i, _, _), selection in zip(together, chosen, strict=True):
                out[i] = selection
        if _select_first:  # after the selections: the appends write columns they may read
            close_segments(closing)
        return out


UNIT_FIELDS = ("reps", "valid", "sizes", "position")  # what a selection reads (choose_units' order)


def spread(top: torch.Tensor, radius: int, span: tuple[int, int]) -> torch.Tensor:
    """with_spans with the best SPAN_SEEDS of top's [H, n] positions (at least one) as seeds:
    what `chunk_span` and `ingest_span` apply to their votes."""
    return with_spans(top, max(1, round(SPAN_SEEDS * top.shape[1])), radius, span)


def with_spans(top: torch.Tensor, seeds: int, radius: int, span: tuple[int, int]) -> torch.Tensor:
    """top [H, n] distinct positions of [start, end) = `span`, best first -> the same number
    of distinct positions, best first: each of the first `seeds` brings the positions within
    `radius` of it (inside `span`), in its rank's place, nearest first (the seed itself, then
    -1, +1, -2, ...: a span the budget cuts keeps its middle), and the rest of `top` follows
    (a question's best votes fall on a few tokens of the sentence it needs; this brings the
    sentence whole)."""
    H, n = top.shape
    start, end = span
    distance = torch.arange(1, radius + 1, device=top.device)
    offsets = torch.cat((distance.new_zeros(1), torch.stack((-distance, distance), dim=1).view(-1)))  # 0, -1, +1, ...
    around = (top[:, :seeds, None] + offsets).view(H, -1)
    around = torch.where((around >= start) & (around < end), around, -1)
    order = torch.cat((around, top), dim=1)  # [H, m]: -1 = outside the span
    m = order.shape[1]
    rank = torch.arange(m, device=top.device).expand(H, -1)
    first_seen = torch.full((H, end - start + 1), m, dtype=torch.int64, device=top.device)
    slot = torch.where(order >= 0, order - start, end - start)  # -1s share the last column
    first_seen.scatter_reduce_(1, slot, rank, reduce="amin")
    keep = (order >= 0) & (torch.gather(first_seen, 1, slot) == rank)
    # the kept positions in their order: a stable sort moves them first (there are >= n: top's own)
    picked = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
    return torch.gather(order, 1, picked)


def close_segments(closing: list[tuple[LouisKVPolicy, int]]) -> None:
    """Each policy's open segment, tokens [open_start, end) (all evicted, so summed in
    open_sum), becomes a unit of every row whose representative is their mean key (while its
    table has room: else it stays open). One append_units writes all of them."""
    ready = []
    for policy, end in closing:
        if end <= policy.open_start or policy.open_sum is None:
            continue
        table = policy._table(policy.open_sum.device)
        if table.room == 0:
            if not policy._capacity_warned:
                log.warning("louiskv unit table full (%d units per row): segments stay open", table.num_units)
                policy._capacity_warned = True
            continue
        ready.append((policy, end, table))
    if not ready:
        return
    groups: dict[tuple, list] = {}  # append_units takes tables of one shape (a prefix's sessions own less)
    for item in ready:
        groups.setdefault((tuple(item[2].reps.shape), tuple(item[2].position.shape)), []).append(item)
    for group in groups.values():
        _append_segments(group)


def _append_segments(ready: list[tuple[LouisKVPolicy, int, _UnitTable]]) -> None:
    """close_segments for tables of one shape: one append_units launch."""
    device = ready[0][2].reps.device
    lengths = [end - policy.open_start for policy, end, _ in ready]
    sums = torch.stack([policy.open_sum for policy, _, _ in ready])  # [S, B, D] f32
    counts = to_device(torch.tensor(lengths, dtype=torch.float32), device).view(-1, 1, 1)
    means = to_reps(sums / counts, ready[0][2].reps.dtype)
    kernels.append_units(
        [tuple(getattr(table, name) for name in APPEND_FIELDS) for _, _, table in ready], means,
        [table.own_units for _, _, table in ready], [table.own_tokens for _, _, table in ready],
        [policy.open_start for policy, _, _ in ready], lengths,
    )  # fmt: skip
    for j, ((policy, end, table), n) in enumerate(zip(ready, lengths, strict=True)):
        if table.mirror is not None:  # its host copy takes the new column at its next fetch
            table.mirror.log.append((means[j], table.own_units, table.own_tokens, policy.open_start, n))
        table.advance(1, n)
        policy.seg_bounds.append((policy.open_start, end))
        policy.open_start = policy.closed_upto = end
        retire(policy.open_sum)  # the stack above may still read it (server/streams.py)
        policy.open_sum = None


APPEND_FIELDS = ("reps", "sizes", "valid", "position")  # kernels.append_units' order


def publish_open(policies: list[LouisKVPolicy]) -> None:
    """Where a policy's table is mapped (worker_selection), its open segment's sum where its
    worker reads it (one copy launch for all)."""
    held = [p for p in policies if p.mapped is not None and p.open_sum is not None]
    if held:
        torch._foreach_copy_([p.mapped["open_sum"] for p in held], [p.open_sum for p in held])


def table_state(policy) -> tuple[int, int, int] | None:
    """(filled unit columns, filled candidate columns, the open segment's first token) of a
    policy whose table is mapped (pb.MappedTableState); None for any other."""
    if getattr(policy, "mapped", None) is None:
        return None
    table = policy.units
    return (0, 0, policy.open_start) if table is None else (table.num_units, table.num_tokens, policy.open_start)


def choose_units(
    q: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor,
    pinned: torch.Tensor | None, budget: int, aggregate: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The retrieval of B independent rows: queries q [B, G, D] score the units (reps [B, U, D],
    valid, sizes [B, U]), the best fill `budget` minus the pinned tokens (pinned [B, P]
    ascending, -1 padded, or None) and expand to their candidates (position [B, M], grouped by
    unit: kernels.expand_grouped reads only the chosen units' columns) -> (positions
    [B, budget] -1 padded, tokens taken per unit [B, U]). Rows never mix: stacking several
    sessions' rows gives each the rows it gets alone."""
    return fill_budget(kernels.score_units(q, reps, valid, agg=aggregate), sizes, position, pinned, budget)


def fill_budget(
    scores: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor, pinned: torch.Tensor | None, budget: int,
    tail: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """choose_units once the units are scored (scores [B, U] f32): the best fill `budget` less
    the pinned tokens and expand to their candidates (position, then `tail`'s columns where
    given: kernels.expand_grouped) -> (positions [B, budget], tokens taken per unit [B, U])."""
    free = budget - (0 if pinned is None else pinned.shape[1])  # slots the units fill
    take = kernels.select_under_budget(scores, sizes, free)  # [rows, units]
    if pinned is None:
        return kernels.expand_grouped(take, sizes, position, budget, tail=tail), take
    # A row whose units all fit the budget takes them all (exact, its pinned tokens among
    # them); the others keep their pinned tokens and fill the rest with the best units.
    return kernels.expand_pinned(take, sizes, scores, position, pinned, budget, tail=tail)


def choose_units_split(
    q: torch.Tensor, segments: list[tuple[torch.Tensor, ...]], pinned: torch.Tensor | None, budget: int,
    aggregate: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """choose_units over a table in column segments (reps, valid, sizes, position each, in
    UNIT_FIELDS' order; _UnitTable.segments: a shared prefix's table, then the session's own)
    without concatenating the large fields: each segment's units are scored into their columns
    of one [B, U] score tensor, the sizes ([B, U] int32, small) are joined, and the expansion
    reads the candidates of the last segment as its `tail` (one launch each on a GPU, five in
    all against choose_units' three). The same result as choose_units over the concatenated
    fields. Over three or more segments (a prefix over a prefix) all but the last are joined."""
    if len(segments) == 1:
        return choose_units(q, *segments[0], pinned, budget, aggregate)
    widths = [segment[2].shape[1] for segment in segments]
    scores = torch.empty(q.shape[0], sum(widths), dtype=torch.float32, device=q.device)
    first = 0
    for (reps, valid, _, _), width in zip(segments, widths, strict=True):
        if width:
            kernels.score_units(q, reps, valid, agg=aggregate, out=scores[:, first : first + width])
        first += width
    sizes = torch.cat([segment[2] for segment in segments], dim=1)
    head = segments[0][3] if len(segments) == 2 else torch.cat([segment[3] for segment in segments[:-1]], dim=1)
    return fill_budget(scores, sizes, head, pinned, budget, tail=segments[-1][3])


STACK_MAX_BYTES = 16 << 20
"""select_together stacks tables up to this many bytes in all (fewer launches); larger ones,
or a single session's, are chosen one session at a time on views of their own tables. In the
H200 e2e at 32K x 8 the stacking copies took 0.28 ms of the daemon's 1.2 ms of kernels per
retrieval (bench/results/2026-12-01-h200-kernels32k-daemon-kernels.json), and the workers on
the same GPU lose about the daemon's kernel time (scripts/gpu_timeslice_probe.py)."""


STACK_TABLE_BYTES = 64 << 20
STACK_TOTAL_BYTES = 1 << 30
"""... and also stacks tables that average up to STACK_TABLE_BYTES each, up to STACK_TOTAL_BYTES in
all: many small tables (64 sequences at 4K: ~21 MB each at the Llama-3-8B shape, ~7.5 in a call
at 11.7% boundaries) cost the daemon ~0.6 ms of host time each one by one (three selection
launches and their checks, beside a decoding worker's Python under the interpreter lock) against
~0.1 ms of GPU time for the whole call's copies. With the daemon embedded in the worker: 0 late
steps in 2 of 2 runs stacked against 6 and 11 one by one, 4,160-4,223 against 3,608-3,940
tokens/s (bench/results/2026-12-03-h200-many1-*). Tables of 16K tokens and more (~84 MB) stay
one by one, as they were measured at 32K x 8."""


def stacks(table_bytes: list[int]) -> bool:
    """Whether select_together stacks tables of these filled sizes (STACK_MAX_BYTES,
    STACK_TABLE_BYTES, STACK_TOTAL_BYTES); never a single one."""
    if len(table_bytes) < 2:
        return False
    total = sum(table_bytes)
    return total <= STACK_MAX_BYTES or (total <= STACK_TOTAL_BYTES and total <= STACK_TABLE_BYTES * len(table_bytes))


def select_together(policies: list[LouisKVPolicy], queries: list[torch.Tensor]) -> list[Selection]:
    """Every layer's retrieval of several sessions (one batch_key, tables not empty; queries
    [L, Hq, D] each). Small tables are stacked row-wise up to the widest one (a table's columns
    past its own units are invalid and empty, so its candidate columns past its own belong to no
    unit and are never read): one concatenation per field a selection reads (UNIT_FIELDS),
    then one scoring, one selection and one expansion for all
    of them. A single session, or large tables (stacks()), go one by one without copies.
    Either way each session gets what _select gives it alone."""
    first = policies[0]
    L, H, D = first.layout.num_layers, first.layout.num_kv_heads, first.layout.head_dim
    rows, R = L * H, first.config.budget
    tables = [policy.units for policy in policies]
    if not stacks([t.filled_nbytes for t in tables]):
        # Each on its own tables (views): stacking copies every field of every table (about
        # 0.17 GB per 32K-token session of a Llama-3-8B shape), GPU time taken from the workers.
        return [policy._choose_every_layer(query) for policy, query in zip(policies, queries, strict=True)]
    width = {"unit": max(t.num_units for t in tables), "token": max(t.num_tokens for t in tables)}
    stacked = {
        name: torch.cat([t.field(name, width["unit" if name in UNIT_COLUMNS else "token"]) for t in tables])
        for name in UNIT_FIELDS
    }  # fmt: skip
    pinned = None if first.pinned is None else torch.cat([policy.pinned for policy in policies])
    q = torch.cat([query.reshape(rows, -1, D) for query in queries])
    new, take = choose_units(q, *(stacked[name] for name in UNIT_FIELDS), pinned, R, first.config.aggregate)
    units = (take > 0).view(len(policies), -1).sum(dim=1)
    return [Selection(block.view(L, H, R), units=units[i]) for i, block in enumerate(new.view(len(policies), rows, R))]
