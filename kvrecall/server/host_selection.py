"""Host selection (the daemon's `host_selection`): a background louiskv retrieval chosen and
placed by the host, with no kernel of the daemon's after the segment close.

A worker on the same GPU loses about what the daemon's retrieval kernels take and more: each
burst of them preempts the worker's context (CUDA contexts of two processes time-slice). On an
H200 at 32K x 8 a boundary cost the step 1.126x with the retrieval's ~28 launches and 1.025x
with none (`dry_retrievals`), while copy-engine transfers of another process cost a decoding
worker nothing measurable (scripts/gpu_timeslice_probe.py, `dma` mode). So here the daemon
copies what a selection reads to host memory (the query, the slot positions, the pinned tokens
and, once, the unit table: transfers, one stream sync), scores, selects and plans the placement
on the CPU (the PyTorch references the CPU daemon runs: the same choice), gathers the new rows
from the pool and sends them by the copy engine into the session's staging area, with their
targets and the new slot positions, for the worker to copy into their slots (worker copies:
placement_staged). What stays on the GPU is the open segment's close (a few launches).

Used for a background retrieval whose caller asks for worker copies, of a louiskv session whose
staging area takes a whole retrieved region (`WorkingSet.stages_every_row`), with units in a
table of its own (no shared prefix); the others go the device's way in the same call.

The unit table's mirror (HostTable) follows the device table: the segments closed since the
last retrieval come as their mean keys (one transfer each, logged by louiskv's close); anything
else (a chunk's clusters, a first use) copies the whole table again.
"""

from __future__ import annotations

import logging

import torch

from kvrecall.kernels import placement_staged, reference
from kvrecall.phases import mark
from kvrecall.server.policies import louiskv
from kvrecall.server.policies.base import Selection
from kvrecall.server.policies.louiskv import (
    APPEND_FIELDS,
    UNIT_COLUMNS,
    UNIT_FIELDS,
    LouisKVPolicy,
    close_segments,
)
from kvrecall.server.working_set import Placement

log = logging.getLogger("kvrecall.host_selection")

_enabled = False  # the daemon's host_selection: configure()


_place_on_device = False  # the daemon's worker_selection_place == "device": configure()


def configure(host_selection: bool, worker_selection_place: str = "host") -> None:
    global _enabled, _place_on_device
    _enabled = bool(host_selection)
    _place_on_device = worker_selection_place == "device"


def places_on_device() -> bool:
    """Whether a worker's choice is placed by the daemon's placement kernels (chosen_selections)
    rather than from the host (place_chosen)."""
    return _place_on_device


def enabled() -> bool:
    return _enabled


def eligible(session, worker_copies: bool, background: bool) -> bool:
    """Whether this retrieval goes the host's way (module docstring)."""
    policy, ws = session.policy, session.ws
    return (
        _enabled and background and worker_copies and ws.stages_every_row and isinstance(policy, LouisKVPolicy)
        and policy.units is not None and policy.units.base is None and policy.units.num_units > 0
        and session.store.page_rows_aligned
    )  # fmt: skip


class HostTable:
    """A host copy of one session's unit table: the fields a selection reads (UNIT_FIELDS), reps
    in f32 (the CPU scores in f32 either way), filled to `units` / `tokens` columns. `log`: the
    segments the device table closed since the last fetch, (mean keys [B, D] on the device, unit
    column, candidate column, first position, length), appended by louiskv's close."""

    def __init__(self) -> None:
        self.fields: dict[str, torch.Tensor] = {}
        self.units = self.tokens = 0
        self.log: list[tuple[torch.Tensor, int, int, int, int]] = []

    def __deepcopy__(self, memo) -> None:
        return None  # a copied policy (a prefix's template, a derived session) mirrors its own table anew

    def fetch(self, table) -> tuple:
        """Queue the transfers that bring this mirror up to `table` (on the current stream,
        into pinned memory): ("log", [(means on the host, ...)]) or ("whole", {field: copy})."""
        logged_units = self.units + len(self.log)
        logged_tokens = self.tokens + sum(entry[4] for entry in self.log)
        if self.fields and (logged_units, logged_tokens) == (table.num_units, table.num_tokens):
            fetched = [(_to_host(means), *rest) for means, *rest in self.log]
            self.log = []
            return "log", fetched
        self.log = []
        return "whole", {name: _to_host(getattr(table, name)) for name in UNIT_FIELDS}

    def apply(self, fetched: tuple, table) -> None:
        """After the sync: the fetched columns into the mirror."""
        kind, data = fetched
        if kind == "whole":
            reps = data["reps"]
            if "reps" not in self.fields or self.fields["reps"].shape != reps.shape:
                self.fields["reps"] = torch.empty(reps.shape, dtype=torch.float32)
            self.fields["reps"][:, : table.num_units] = reps[:, : table.num_units]
            for name in ("valid", "sizes", "position"):
                self.fields[name] = data[name]
        elif data:  # the closed segments, as the device's append_units wrote them
            means, units, tokens, starts, lengths = zip(*data, strict=True)
            mirror = tuple(self.fields[name] for name in APPEND_FIELDS)
            reference.append_units([mirror] * len(data), torch.stack(means), list(units), list(tokens), list(starts),
                                   list(lengths))  # fmt: skip
        self.units, self.tokens = table.num_units, table.num_tokens

    def view(self, name: str) -> torch.Tensor:
        return self.fields[name][:, : self.units if name in UNIT_COLUMNS else self.tokens]


def retrieve(sessions: list) -> list[tuple[Placement, int, str]]:
    """Every layer's retrieval of each session (all eligible; under their locks, after
    begin_boundary) -> (its placement, rows left in its staging area, how its table's host copy
    was brought up to date: "whole" or "log"), the rows' transfers queued on the current stream
    (the caller's sync covers them)."""
    if not louiskv.selects_first():
        close_open(sessions)
    fetched = []
    for session in sessions:
        policy, ws = session.policy, session.ws
        if policy.units.mirror is None:
            policy.units.mirror = HostTable()
        pinned = None if policy.pinned is None else _to_host(policy.pinned)
        fetched.append((policy.units.mirror.fetch(policy.units), _to_host(ws.query), _to_host(ws.slot_pos),
                        pinned, _to_host(ws.max_resident_counter)))  # fmt: skip
    _sync(sessions)
    mark("host_fetch")
    placed = [_place(session, *parts) for session, parts in zip(sessions, fetched, strict=True)]
    if louiskv.selects_first():  # the mirrors take the closed segments at their next fetch
        close_open(sessions)
    return placed


def _place(session, table_part, query, slot_pos, pinned, resident_max) -> tuple[Placement, int, str]:
    """One session's selection, plan and transfers (after the fetch's sync)."""
    policy, ws = session.policy, session.ws
    mirror = policy.units.mirror
    mirror.apply(table_part, policy.units)
    L, H, D = ws.layout.num_layers, ws.layout.num_kv_heads, ws.layout.head_dim
    new, units = choose_on_host(
        query.float().reshape(L * H, -1, D), *(mirror.view(name) for name in UNIT_FIELDS), pinned,
        ws.plan.retrieved, policy.config.aggregate,
    )  # fmt: skip
    mark("host_select")
    placement, n = _stage(session, new, units, slot_pos, resident_max)
    return placement, n, table_part[0]


def takes_choice(session) -> bool:
    """Whether the daemon places this session's worker's own choice (StepEvent.worker_selected,
    the daemon's worker_selection): its unit table is mapped and holds units, its pinned tokens
    (if it keeps any) are set, and its staging area takes a whole retrieval (placed from the host)
    or the daemon's kernels place it. Otherwise the daemon selects itself, as for any event."""
    policy, ws = session.policy, session.ws
    return (
        bool(ws.table_fields) and (ws.stages_every_row or _place_on_device) and isinstance(policy, LouisKVPolicy)
        and policy.units is not None and policy.units.base is None and policy.units.num_units > 0
        and ("pinned" not in ws.table_fields or policy.pinned is not None) and session.store.page_rows_aligned
    )  # fmt: skip


def place_chosen(sessions: list) -> list[tuple[Placement, int]]:
    """Place each session's worker's choice (all takes_choice; under their locks, after
    begin_boundary, which ordered this after the worker's published writes) -> (its placement,
    rows left in its staging area); then the open segments close (the worker took each as a unit
    without writing the table: kvrecall/client/selection.py). A choice the table does not hold
    (_holds) is the daemon's instead (louiskv's selection on the device, the segment closed first)."""
    fetched = [(_to_host(session.ws.table_fields["chosen"]), _to_host(session.ws.table_fields["chosen_meta"]),
                _to_host(session.ws.slot_pos), _to_host(session.ws.max_resident_counter)) for session in sessions]  # fmt: skip
    _sync(sessions)
    mark("host_fetch")
    out = []
    for session, (new, meta, slot_pos, resident_max) in zip(sessions, fetched, strict=True):
        units = int(meta[0])
        if not _holds(session, meta):
            selection = _choose_here(session)
            new, units = _to_host(selection.positions.view(new.shape)), _to_host(selection.units)
            _sync([session])
            units = int(units)
        out.append(_stage(session, _in_tier(session, new), torch.tensor(units), slot_pos, resident_max))
    close_open(sessions)
    return out


def chosen_selections(sessions: list) -> list[Selection]:
    """Each session's worker's choice as a Selection over its mapped result (all takes_choice;
    after begin_boundary) for the daemon's own placement, the caller closing the open segments
    after it. Reads what the choices were made over (one small transfer and a sync); a choice
    the table does not hold (_holds) is the daemon's instead (as place_chosen)."""
    metas = [_to_host(session.ws.table_fields["chosen_meta"]) for session in sessions]
    _sync(sessions)
    out = []
    for session, meta in zip(sessions, metas, strict=True):
        fields = session.ws.table_fields
        if not _holds(session, meta):
            out.append(_choose_here(session))
            continue
        L, H = session.layout.num_layers, session.layout.num_kv_heads
        out.append(Selection(_in_tier(session, fields["chosen"]).view(L, H, -1), units=fields["chosen_meta"][0].clone()))
    mark("host_fetch")
    return out


def _holds(session, meta: torch.Tensor) -> bool:
    """Whether the session's table holds what its worker chose over (chosen_meta: unit and
    candidate columns, the open segment's first token): those columns filled (columns are only
    ever appended: a notice riding in the event may have closed one more since) and the open
    segment starting there or later. Otherwise (a worker's stale or wrong state) it is logged
    and the daemon chooses."""
    policy = session.policy
    table = policy.units
    _, unit_columns, token_columns, start = meta.tolist()
    if unit_columns <= table.num_units and token_columns <= table.num_tokens and start <= policy.open_start:
        return True
    log.warning("session %s: the worker chose over %d units, %d candidates and an open segment from %d; the table "
                "holds %d, %d, from %d: the daemon chooses", session.session_id, unit_columns, token_columns, start,
                table.num_units, table.num_tokens, policy.open_start)  # fmt: skip
    return False


def _in_tier(session, chosen: torch.Tensor) -> torch.Tensor:
    """A worker's chosen positions with any outside the session's host tier (a worker's bug:
    they would read pages it never wrote) as -1, none chosen."""
    return torch.where((chosen >= 0) & (chosen < session.store.num_tokens), chosen, -1)


def _choose_here(session) -> Selection:
    """The daemon's own boundary choice (louiskv's: the open segment closed first)."""
    close_open([session])
    return session.policy._choose_every_layer(session.ws.query)


def close_open(sessions: list) -> None:
    """Each louiskv session's open output segment, up to its evicted end, closed into its table
    (one launch: louiskv.close_segments)."""
    close_segments([(session.policy, session.evicted_upto) for session in sessions])
    mark("close")


def _sync(sessions: list) -> None:
    device = sessions[0].ws.keys.device
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _stage(session, new: torch.Tensor, units: torch.Tensor, slot_pos: torch.Tensor,
           resident_max: torch.Tensor) -> tuple[Placement, int]:  # fmt: skip
    """Plan the retrieved region for the chosen positions `new` [B, R] (host, -1 padded), send the
    new rows into the staging area and the slot positions to the device -> (placement, rows)."""
    ws, store = session.ws, session.store
    L, H, D = ws.layout.num_layers, ws.layout.num_kv_heads, ws.layout.head_dim
    S, R, C = ws.plan.n_sink, ws.plan.retrieved, ws.plan.capacity
    rows = slot_pos.view(L * H, C)
    region = rows[:, S : S + R]
    page_base = store.page_table_host
    final, filled, counts = reference.plan_region(region.long(), new.long(), page_base.numel() * store.tokens_per_page)
    region.copy_(final)
    mark("host_plan")
    row, column = filled.nonzero(as_tuple=True)
    positions = final[row, column]
    n = positions.numel()
    source = torch.cat([reference.host_rows(page_base, row, kv, positions, store.tokens_per_page, H, D) // D
                        for kv in (0, 1)])  # fmt: skip
    targets = row * C + S + column
    resident_max[0] = max(int(resident_max[0]), int((rows >= 0).sum(dim=1).max()))
    mark("host_rows")
    staging, pin = ws.staging, ws.keys.is_cuda
    if n:
        staging.targets[:n].copy_(targets.pin_memory() if pin else targets, non_blocking=pin)
        pool_rows = store.flat[: store.flat.numel() // D * D].view(-1, D)
        pieces = [(0, n, staging.keys, 0), (n, 2 * n, staging.values, 0)]
        placement_staged.gather_upload(pool_rows, source, pieces, None, pin)
    ws.slot_pos.copy_(slot_pos, non_blocking=pin)
    ws.max_resident_counter.copy_(resident_max, non_blocking=pin)
    staging.rows = n
    mark("host_upload")
    valid = counts[:, 0].long()
    totals = torch.stack((valid.sum(), torch.tensor(n), units, valid.max()))
    placement = Placement(totals, row_bytes=D * ws.keys.element_size())
    ws.last_placement = placement
    session.unfinished.append(placement)
    return placement, n


def choose_on_host(
    q: torch.Tensor, reps: torch.Tensor, valid: torch.Tensor, sizes: torch.Tensor, position: torch.Tensor,
    pinned: torch.Tensor | None, budget: int, aggregate: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """louiskv.choose_units' choice on host tensors, the same positions per row as sets (in
    another column order) -> (positions [B, budget] int64 -1 padded, units chosen: an int64
    scalar). A top-k of the units (widened until it fills the budget) instead of a sort of
    them all, and the chosen units' candidates read by their offsets: 8.8 against 19.4 ms
    for choose_units' references at 32K on the H200 host's 16 cores
    (scripts/host_selection_probe.py)."""
    per_head = torch.bmm(reps, q.transpose(1, 2))  # [B, U, G]
    scores = per_head.amax(dim=2) if aggregate == "max" else per_head.sum(dim=2)
    scores.masked_fill_(~valid, float("-inf"))
    mark("host_score")
    B, U = scores.shape
    wide = torch.where(valid, sizes.long().clamp_min(0), 0)
    offsets = sizes.long().cumsum(dim=1) - sizes.long()  # each unit's first candidate column
    free = budget - (0 if pinned is None else pinned.shape[1])
    k = min(U, 2 * free // max(1, int(wide.float().mean())) + 8)
    while True:
        top = torch.topk(scores, k, dim=1, sorted=True)
        chosen_sizes = wide.gather(1, top.indices)
        before = chosen_sizes.cumsum(dim=1) - chosen_sizes
        taken = torch.minimum(chosen_sizes, (free - before).clamp_min(0))
        if k == U or bool((before[:, -1] + chosen_sizes[:, -1] >= free).all()):
            break
        k = min(U, 2 * k)
    mark("host_topk")
    starts = offsets.gather(1, top.indices)  # [B, k]
    # column j of the output: the unit whose taken span covers it, and the rank inside it
    ends = taken.cumsum(dim=1)
    column = torch.arange(free)
    unit_at = torch.searchsorted(ends, column.expand(B, -1).contiguous(), right=True).clamp_(max=k - 1)
    rank = column - (ends.gather(1, unit_at) - taken.gather(1, unit_at))
    where = (starts.gather(1, unit_at) + rank).clamp_(0, position.shape[1] - 1)  # (columns past the last: masked)
    out = torch.where(column < ends[:, -1:], position.gather(1, where).long(), -1)
    units = (taken > 0).sum()
    if pinned is None:
        return out, units
    chosen = torch.cat((pinned, reference.drop_members(out, pinned)), dim=1)
    fits = wide.sum(dim=1) <= budget  # these rows take every unit (their pinned tokens among them)
    if bool(fits.any()):
        rows = fits.nonzero().flatten()
        every = reference.expand_grouped(wide[rows], sizes[rows], position[rows], budget)
        chosen[rows] = every
        units = (taken[~fits] > 0).sum() + (wide[rows] > 0).sum()
    return chosen, units


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy (pinned, queued on the current stream without a sync: the caller syncs)."""
    if tensor.is_cuda:
        return tensor.to("cpu", non_blocking=True)
    return tensor.clone()
