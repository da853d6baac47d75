"""The Policy interface every KV method implements, and the registry that finds them.

A policy is a `@dataclass` of hyper-parameters (validated in `__post_init__`) plus a few
hooks; one instance lives per session (adding a method is adding a file). The prompt
arrives layer by layer (`on_ingest_layer`, then `on_ingest_done`), so a policy does its
prompt work per layer while the worker computes the next ones.
Shapes: L layers, H KV heads, Hq query heads, D head dim, R retrieved slots, T max tokens.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvrecall.server.errors import InvalidArgument
from kvrecall.server.host_store import SequenceStore
from kvrecall.server.layout import ModelLayout, WorkingSetPlan
from kvrecall.server.working_set import WorkingSet, to_device
from kvrecall.sizes import TOKEN_COUNT_FIELDS
from kvrecall.v1 import kvrecall_pb2 as pb

# Tokens appended between AppendNotices unless a policy says otherwise.
DEFAULT_SPILL_EVERY = 16


@dataclass(frozen=True)
class Chunk:
    """The KV of a chunk of new tokens (ChunkAppend): kv [L, 2, H, n, D] for tokens
    [start, start + n), on the daemon's device or mapped from the worker."""

    start: int
    kv: torch.Tensor

    def keys(self, start: int, end: int) -> torch.Tensor:
        """Keys of tokens [start, end) (inside the chunk): [L, H, end - start, D]."""
        return self.kv[:, 0, :, start - self.start : end - self.start]


@dataclass
class PolicyContext:
    """What a policy may touch: its session's layout, host KV and working set."""

    layout: ModelLayout
    store: SequenceStore
    ws: WorkingSet
    prompt_tokens: int = 0
    evicted_upto: int = 0  # tokens [n_sink, evicted_upto) have left the window
    chunk: Chunk | None = None  # during a ChunkAppend: the chunk whose tokens on_evict sees

    @property
    def ingest_range(self) -> tuple[int, int]:
        """The prompt tokens that left the window at ingest: [min(n_sink, T), evicted_upto)."""
        return min(self.ws.plan.n_sink, self.prompt_tokens), self.evicted_upto


@dataclass(frozen=True)
class BoundaryRule:
    mode: int = pb.BOUNDARY_MODE_NEVER  # a pb.BoundaryMode value
    threshold: float = 0.0
    pre_rope: bool = False  # the worker compares queries with RoPE undone


@dataclass(frozen=True)
class Selection:
    """Token positions for the retrieved region: int64 [L, H, R], -1 padded."""

    positions: torch.Tensor
    units: int | torch.Tensor = (
        0  # retrieval units chosen (stats; a device scalar is read after the operation)
    )


class Policy:
    """Base class with no-op hooks; subclasses set `name` and `Config`."""

    name: ClassVar[str]
    proto_field: ClassVar[str]  # the PolicyConfig oneof field holding its config
    Config: ClassVar[type]

    def __init__(self, config: Any, layout: ModelLayout) -> None:
        self.config = config
        self.layout = layout

    def plan(self) -> WorkingSetPlan:
        raise NotImplementedError

    def boundary_rule(self) -> BoundaryRule:
        return BoundaryRule()

    def observation(self) -> int:
        """How many last-prompt-token queries IngestPrompt should carry."""
        return 0

    def fallback(self) -> str | None:
        """What this policy assumed for a setting the request left unset, as one line for the
        daemon's log (which names the session), or None."""
        return None

    def metadata_bytes(self) -> int:
        """Upper bound of the device bytes this policy's per-session state (centroids, unit
        tables, page bounds, ...) will hold for `layout.max_tokens` tokens: reserved in the
        device pool at OpenSession. Scratch space of a single operation is not counted."""
        return 0

    def template(self) -> Policy:
        """This state as a held prefix's template (prefixes.register): by default a deep copy.
        louiskv shares the unit tables of the prefixes it extends (read-only, held by them)."""
        return copy.deepcopy(self)

    def derive(self) -> Policy:
        """A new session's own state over this one, a held prefix's template (never run): what
        the session would hold had it ingested the prefix itself. By default a deep copy; a
        policy whose prompt index is read-only after the ingest shares it (louiskv)."""
        return copy.deepcopy(self)

    def derived_metadata_bytes(self) -> int:
        """What `derive()`'s session reserves in the device pool (metadata_bytes of a copy)."""
        return self.metadata_bytes()

    def on_ingest_layer(
        self, ctx: PolicyContext, layer: int, kv: torch.Tensor, queries: torch.Tensor | None
    ) -> None:
        """Layer `layer` of the prompt is in the host tier and its sinks/window are placed.
        kv: [2, H, T, D] (read it now: it is not kept); queries: [Hq, n_obs, D] f32 or None.
        Layers arrive in order, each once; ctx.prompt_tokens / evicted_upto are final."""

    def on_ingest_done(self, ctx: PolicyContext) -> Selection | None:
        """Every layer arrived: the first selection."""
        return None

    def on_evict(self, ctx: PolicyContext, start: int, end: int) -> Selection | None:
        """Tokens [start, end) left the window (they are in the host tier); may re-place them.
        They were in the window ring, or, when ctx.chunk holds them, came in a chunk and never
        entered it (their keys are in ctx.chunk)."""
        return None

    # Whether on_evict_many uses the keys that left the window summed per row (the batched
    # notice computes them on the way when a session's policy asks).
    wants_evicted_sums: ClassVar[bool] = False

    @classmethod
    def on_evict_many(
        cls, items: list[tuple[Policy, PolicyContext, int, int, torch.Tensor | None]]
    ) -> list[Selection | None]:
        """on_evict of several sessions of this class in one Boundaries call: (policy, ctx,
        start, end, sums) each, where the tokens' ring slots are already empty (their keys
        are still there) and `sums` (float32 [L * H, D]: their keys summed per row, when
        wants_evicted_sums) may stand in for reading them. This default runs them one by one."""
        return [policy.on_evict(ctx, start, end) for policy, ctx, start, end, _ in items]

    def on_boundary(self, ctx: PolicyContext, query: torch.Tensor, layers: list[int]) -> Selection | None:
        """query: [L, Hq, D] (the worker's latest per-layer query). Return what to retrieve."""
        return None

    def batch_key(self) -> Hashable | None:
        """Sessions of this policy class with equal keys (not None) retrieve together in a
        Boundaries call (`on_boundaries`): their metadata has the same shapes. None: alone."""
        return None

    @classmethod
    def on_boundaries(cls, items: list[tuple[Policy, PolicyContext, torch.Tensor]]) -> list[Selection | None]:
        """Boundaries of several sessions at once, every layer: (policy, ctx, query [L, Hq, D])
        each, all with one batch_key. A policy that batches scores, selects and expands them
        together (the same selections as on_boundary one by one); this default runs them one
        by one."""
        return [policy.on_boundary(ctx, query, list(range(policy.layout.num_layers))) for policy, ctx, query in items]

    @property
    def num_units(self) -> int:
        return 0


def fill_free_slots(ctx: PolicyContext, start: int, end: int) -> Selection | None:
    """Place the newest of the tokens [start, end) that just left the window into free
    retrieved slots (all heads alike), so an unfilled budget holds recent context and a
    budget >= the sequence length keeps every token (exactness).

    No host sync: "how many slots are free" stays on the device; once a placement filled
    some row (the usual state after the first retrieval: every row takes the same number of
    tokens, so none fit) this returns None at once."""
    if ctx.ws.plan.retrieved == 0 or ctx.ws.retrieved_row_full():
        return None
    current = ctx.ws.retrieved_positions()
    L, H, R = current.shape
    free = (current < 0).sum(dim=-1).amin()
    fresh = torch.arange(start, end, dtype=torch.int64, device=current.device)
    fresh = torch.where(fresh >= end - free, fresh, -1)  # the newest `free` of them
    merged = torch.cat((current, fresh.expand(L, H, -1)), dim=-1).view(L * H, -1)
    return Selection(compact(merged >= 0, merged, R).view(L, H, R))


def fill_free_slots_many(items: list[tuple[PolicyContext, int, int]]) -> list[Selection | None]:
    """fill_free_slots(ctx, start, end) of several sessions: the same selections, computed
    in one set of ops per group of like working sets (a Boundaries call's notices at 64
    sequences paid ~20 launches per session one by one: 0.8 ms of the daemon's host time
    each on an H200). A session's tokens [start, end) are padded to the group's longest
    with -1, which compact() drops like the tokens that do not fit."""
    out: list[Selection | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _, _) in enumerate(items):
        ws = ctx.ws
        if ws.plan.retrieved == 0 or ws.retrieved_row_full():
            continue
        groups.setdefault((ws.plan.n_sink, ws.plan.retrieved, tuple(ws.slot_pos.shape), ws.slot_pos.device), []).append(i)
    for (s, r, _, device), members in groups.items():
        if len(members) == 1:
            ctx, start, end = items[members[0]]
            out[members[0]] = fill_free_slots(ctx, start, end)
            continue
        current = torch.stack([items[i][0].ws.slot_pos[:, :, s : s + r] for i in members]).to(torch.int64)
        S, L, H, R = current.shape
        free = (current < 0).sum(dim=-1).view(S, -1).amin(dim=1, keepdim=True)  # [S, 1]
        spans = [(items[i][1], items[i][2]) for i in members]
        n = max(end - start for start, end in spans)
        bounds = to_device(torch.tensor(spans, dtype=torch.int64), device)
        fresh = bounds[:, :1] + torch.arange(n, dtype=torch.int64, device=device)  # [S, n]
        end = bounds[:, 1:]
        fresh = torch.where((fresh < end) & (fresh >= end - free), fresh, -1)  # the newest `free` of each span
        merged = torch.cat((current, fresh.view(S, 1, 1, n).expand(S, L, H, n)), dim=-1).view(S * L * H, -1)
        for i, positions in zip(members, compact(merged >= 0, merged, R).view(S, L, H, R).unbind(0), strict=True):
            out[i] = Selection(positions)
    return out


def compact(keep: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """Per row, the first `width` positions where `keep` is set, in their order, padded
    with -1 to `width` (prefix sums and one scatter: no sort, no host sync).

    keep: [B, M] bool; positions: [B, M] int64 -> [B, width] int64."""
    rank = keep.cumsum(dim=1) - 1
    column = torch.where(keep & (rank < width), rank, width)  # column `width` collects the rest
    picked = torch.full((keep.shape[0], width + 1), -1, dtype=torch.int64, device=keep.device)
    picked.scatter_(1, column, torch.where(keep, positions, -1).expand_as(column))
    return picked[:, :width]


_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def build_policy(message: pb.PolicyConfig, layout: ModelLayout) -> Policy:
    """Validate a PolicyConfig message and instantiate its policy."""
    name = message.name
    if not name:
        raise InvalidArgument("policy.name", f"required; one of {policy_names()}")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise InvalidArgument("policy.name", f"unknown policy {name!r}; one of {policy_names()}")
    which = message.WhichOneof("config")
    if which is not None and which != cls.proto_field:
        raise InvalidArgument(f"policy.{which}", f"config for {which!r} given with policy.name {name!r}")
    fields: dict[str, Any] = {}
    if which is not None:
        sub = getattr(message, which)
        for field in dataclasses.fields(cls.Config):
            descriptor = sub.DESCRIPTOR.fields_by_name.get(field.name)
            if descriptor is None:
                continue
            if descriptor.has_presence:
                if sub.HasField(field.name):
                    fields[field.name] = getattr(sub, field.name)
            elif descriptor.enum_type is not None:
                if getattr(sub, field.name) != 0:
                    fields[field.name] = getattr(sub, field.name)
    for name in TOKEN_COUNT_FIELDS:
        if fields.get(name, 0) > layout.max_tokens:
            raise InvalidArgument(
                f"policy.{cls.proto_field}.{name}",
                f"{fields[name]} is larger than the sequence can be (layout.max_tokens={layout.max_tokens})",
            )
    if "budget" not in fields and any(f.name == "budget" for f in dataclasses.fields(cls.Config)):
        # The default budget never sizes a working set beyond what the sequence can hold.
        fields["budget"] = min(cls.Config.budget, layout.max_tokens)
    try:
        config = cls.Config(**fields)
    except ValueError as exc:
        raise InvalidArgument(f"policy.{cls.proto_field}", str(exc)) from None
    return cls(config, layout)


def check(condition: bool, field: str, problem: str) -> None:
    """Config validation helper for `__post_init__`: raises ValueError('field: problem')."""
    if not condition:
        raise ValueError(f"{field} {problem}")


def check_resident(config: Any) -> None:
    """The checks every retrieving config (budget, n_sink, window) shares."""
    check(1 <= config.budget <= 1 << 20, "budget", "must be in [1, 1048576]")
    check(config.n_sink <= 4096, "n_sink", "must be <= 4096")
    check(
        2 * DEFAULT_SPILL_EVERY <= config.window <= 1 << 16,
        "window",
        f"must be in [{2 * DEFAULT_SPILL_EVERY}, 65536]",
    )


def resident_plan(config: Any) -> WorkingSetPlan:
    """[n_sink | budget retrieved | window] for a retrieving config."""
    return WorkingSetPlan(
        n_sink=config.n_sink, retrieved=config.budget, window=config.window, spill_every=DEFAULT_SPILL_EVERY
    )


def config_json(policy: Policy) -> dict[str, Any]:
    return dataclasses.asdict(policy.config)
