"""A Boundaries call: one decode step's AppendNotices and retrievals of many sessions at once.

The batched engine sends every slot that crossed a boundary in a step (and every notice that
fell due) in one message. Here, in one worker thread, holding every session's `busy` lock:

1. the notices, together (`append_together`): one launch spills every session's new ring
   tokens to its own host pages, empties the ring slots of the tokens that left each window
   and notes each session's resident count (kernels.spill_evict_many); each policy class then
   takes its sessions' evictions at once (`Policy.on_evict_many`: louiskv adds the keys that
   left to every open segment in one op and closes the full segments in one launch);
2. the retrievals, grouped by policy class and `Policy.batch_key()`: a group is scored,
   selected and expanded together (`Policy.on_boundaries`: louiskv and quest stack their
   sessions' tables; the other policies serve their sessions one by one);
3. a group's selections are placed into their working sets in one launch
   (`WorkingSet.set_retrieved_together`: kernels.place_retrieved_many);
4. one sync of the daemon's stream for all of them, then each session accounts its work.

The service validates every event before this runs (`check_events`), so a bad event refuses
the whole call and no session changes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from kvrecall import kernels, launch_gate, phases
from kvrecall.kernels import placement_staged
from kvrecall.server import host_selection
from kvrecall.server.errors import FailedPrecondition, InvalidArgument
from kvrecall.server.policies.base import Selection
from kvrecall.server.policies.louiskv import LouisKVPolicy
from kvrecall.server.session import Session, check_append_upto, check_boundary_position
from kvrecall.server.working_set import Placement, WorkingSet
from kvrecall.v1 import kvrecall_pb2 as pb

_dry = False  # dry_retrievals (the daemon's diagnostic setting): configure()
_dry_close = False  # dry_retrievals_close: a dry retrieval still closes louiskv's open segment
_dry_launches = (0, 0)  # dry_launches, dry_launch_cycles: a dry retrieval's stand-in kernels


def configure(dry_retrievals: bool, dry_retrievals_close: bool = False, dry_launches: int = 0,
              dry_launch_cycles: int = 0) -> None:  # fmt: skip
    """The daemon's `dry_retrievals`: retrieval events answered without retrieving; with
    `dry_retrievals_close`, louiskv sessions' open output segments still close (the few launches a
    worker's choice leaves the daemon besides the placement: what they cost alone); with
    `dry_launches` N, each dry retrieval group launches N stand-in kernels of `dry_launch_cycles`
    GPU cycles each (spin_kernels: what a launch, and a kernel's length, cost a worker)."""
    global _dry, _dry_close, _dry_launches
    _dry = bool(dry_retrievals or dry_retrievals_close or dry_launches)
    _dry_close = bool(dry_retrievals_close)
    _dry_launches = (int(dry_launches), int(dry_launch_cycles))


_SPIN: dict[torch.device, torch.Tensor] = {}


def spin_kernels(device: torch.device, count: int, cycles: int) -> torch.Tensor:
    """`count` kernels on the current stream of `device`: each spins `cycles` GPU clock cycles
    (torch.cuda._sleep) on a GPU with cycles > 0, else adds 1 to a one-element tensor (the
    shortest kernel) -> that tensor (on a CPU: `count` added to it)."""
    scratch = _SPIN.get(device)
    if scratch is None:
        scratch = _SPIN[device] = torch.zeros(1, dtype=torch.int64, device=device)
    for _ in range(count):
        if device.type == "cuda" and cycles > 0:
            torch.cuda._sleep(cycles)
        else:
            scratch.add_(1)
    return scratch


@dataclass
class StepTiming:
    """When a serve_step call began its work and its sync, and ended (perf_counter seconds)."""

    started: float = 0.0
    syncing: float = 0.0
    ended: float = 0.0
    phases: dict[str, float] | None = None  # seconds per phase (kvrecall/phases.py)


@dataclass
class StepOutcome:
    """What one event did: its notice's (spilled_upto, evicted), its retrieval's placement."""

    append: tuple[int, int] | None = None
    placement: Placement | None = None
    staged_rows: int = 0  # rows its retrieval left in the session's staging area for the worker
    on_host: str = ""  # its retrieval was selected on the host (host_selection): how the table's copy was fetched


def check_events(sessions: list[Session], events: list[pb.StepEvent], background: bool = True) -> None:
    """Every event against its session's state (under the sessions' locks): InvalidArgument /
    FailedPrecondition naming events[i] and the field."""
    for i, (session, event) in enumerate(zip(sessions, events, strict=True)):
        where = f"events[{i}]"
        if not (event.notice or event.retrieve):
            raise InvalidArgument(f"{where}.notice", "an event needs notice or retrieve (or both)")
        if event.worker_selected:
            if not (event.retrieve and background):
                raise InvalidArgument(f"{where}.worker_selected", "needs retrieve on a background call")
            if not session.ws.table_fields:
                raise InvalidArgument(f"{where}.worker_selected",
                                      f"session {session.session_id} maps no unit table (WorkingSetInfo.selection)")  # fmt: skip
        if not session.ingested:
            raise FailedPrecondition(f"{where}: session {session.session_id} has not ingested its prompt")
        if event.notice:
            check_append_upto(session, event.position, f"{where}.position")
        elif event.retrieve:
            check_boundary_position(session, event.position, f"{where}.position")


def serve_step(
    sessions: list[Session], events: list[pb.StepEvent], background: bool = False, batch_notices: bool = True,
    timing: StepTiming | None = None,
) -> tuple[list[StepOutcome], int]:
    """Run a validated Boundaries call (module docstring) -> (one outcome per event, groups).
    `background` (BoundariesRequest.background): the retrievals' placements are background ones
    (kernels.background_reads: under host_reads=copy their rows go by the copy engine).
    `batch_notices` False: each notice alone (Session.append; the same effect, for comparison;
    a call with one notice takes that path anyway). `timing`: filled in (StepTiming). The GPU
    work runs on the calling thread's current stream (server/streams.py)."""
    timing = timing if timing is not None else StepTiming()
    timing.started = time.perf_counter()
    clock = phases.PhaseClock()
    with phases.running(clock):
        outcomes, groups = _serve(sessions, events, background, batch_notices, timing)
    timing.phases = clock.seconds
    timing.ended = time.perf_counter()
    return outcomes, groups


def _serve(
    sessions: list[Session], events: list[pb.StepEvent], background: bool, batch_notices: bool, timing: StepTiming,
) -> tuple[list[StepOutcome], int]:  # fmt: skip
    outcomes = [StepOutcome() for _ in events]
    with contextlib.ExitStack() as held:
        for session in sorted(sessions, key=lambda s: s.session_id):
            held.enter_context(session.busy)
        phases.mark("locks")
        for session in sessions:
            if session.closed:
                raise InvalidArgument("session_id", f"session {session.session_id!r} was closed")
        noticed = [i for i, event in enumerate(events) if event.notice]
        # One notice alone is cheaper by Session.append (H200, in process: 0.41 against 0.69 ms;
        # 8 sessions 0.98 together against 1.55 ms: bench/results/2026-11-30-h200x2-notices-bench.json).
        if batch_notices and len(noticed) > 1:
            appended = append_together([sessions[i] for i in noticed], [events[i].position for i in noticed])
        else:
            appended = [sessions[i].append(events[i].position, None, finish=False) for i in noticed]
        for i, append in zip(noticed, appended, strict=True):
            outcomes[i].append = append
        if noticed:
            phases.mark("notices")
        groups: dict[object, list[int]] = {}
        for i, (session, event) in enumerate(zip(sessions, events, strict=True)):
            if event.retrieve:
                key = session.policy.batch_key()
                groups.setdefault((type(session.policy), key) if key is not None else ("alone", i), []).append(i)
        device = sessions[0].ws.keys.device if sessions else None
        gate = launch_gate.held(device) if groups else contextlib.nullcontext()
        held.enter_context(gate)  # opened before the first host sync (launch_gate.release)
        for members in groups.values():
            items = []
            for i in members:
                session = sessions[i]
                query = session.begin_boundary(events[i].position, [], None)
                items.append((session.policy, session.context(), query))
            if _dry:  # the diagnostic: nothing selected, nothing placed
                for i in members:
                    outcomes[i].placement = Placement()
                if _dry_close and isinstance(items[0][0], LouisKVPolicy):  # (a group: one policy class)
                    host_selection.close_open([sessions[i] for i in members])
                if _dry_launches[0]:
                    spin_kernels(device, *_dry_launches)
                continue
            # The worker's own choices (worker_selection), then where the daemon selects on the host
            # (host_selection): those sessions' retrievals placed from the host.
            chosen = [i for i in members if events[i].worker_selected and host_selection.takes_choice(sessions[i])]
            on_host = [i for i in members if i not in chosen
                       and host_selection.eligible(sessions[i], events[i].worker_copies, background)]  # fmt: skip
            given: dict[int, Selection] = {}  # the workers' choices the device places below (worker_selection_place)
            if chosen and host_selection.places_on_device():
                given = dict(zip(chosen, host_selection.chosen_selections([sessions[i] for i in chosen]), strict=True))
                chosen = []
            if chosen:
                for i, (placement, rows) in zip(chosen, host_selection.place_chosen([sessions[i] for i in chosen]),
                                                strict=True):  # fmt: skip
                    outcomes[i].placement, outcomes[i].staged_rows, outcomes[i].on_host = placement, rows, "worker"
            if on_host:
                for i, (placement, rows, fetch) in zip(on_host, host_selection.retrieve([sessions[i] for i in on_host]),
                                                       strict=True):  # fmt: skip
                    outcomes[i].placement, outcomes[i].staged_rows, outcomes[i].on_host = placement, rows, fetch
            on_host += chosen
            if on_host:
                items = [item for i, item in zip(members, items, strict=True) if i not in on_host]
                members = [i for i in members if i not in on_host]
                if not members:
                    continue
            rest = [item for i, item in zip(members, items, strict=True) if i not in given]
            chose = iter(type(rest[0][0]).on_boundaries(rest) if rest else [])
            selections = [given[i] if i in given else next(chose) for i in members]
            phases.mark("select")
            # Rows of sessions whose workers copy them (StepEvent.worker_copies) stay staged.
            stagings = {
                sessions[i].ws.keys.data_ptr(): sessions[i].ws.staging
                for i in members
                if background and events[i].worker_copies and sessions[i].ws.staging is not None
            }  # fmt: skip
            # A session that stages every row was promised no in-place row (WorkingSetInfo.stages_every_row).
            force = any(sessions[i].ws.stages_every_row for i in members if sessions[i].ws.keys.data_ptr() in stagings)
            with contextlib.ExitStack() as scope:
                if background:
                    scope.enter_context(kernels.background_reads(force_copy=force))
                if stagings:
                    scope.enter_context(placement_staged.worker_copies(stagings))
                placements = _place([sessions[i] for i in members], selections)
            phases.mark("place")
            if given:  # the workers took each open segment as a unit without writing the table: it closes now
                host_selection.close_open([sessions[i] for i in given])
            for i, placement in zip(members, placements, strict=True):
                outcomes[i].placement = placement
                if i in given:
                    outcomes[i].on_host = "worker-device"
                if sessions[i].ws.keys.data_ptr() in stagings:
                    outcomes[i].staged_rows = sessions[i].ws.staging.rows
        launch_gate.release()
        timing.syncing = time.perf_counter()
        if device is not None and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        phases.mark("sync")
        for session in sessions:
            session.finish(synced=True)  # the one sync above covered every session's work
        phases.mark("finish")
    return outcomes, len(groups)


def append_together(sessions: list[Session], uptos: list[int]) -> list[tuple[int, int]]:
    """Session.append(upto, None, finish=False) for several sessions (under their locks), with
    one spill launch per group of like sessions and one on_evict_many per policy class ->
    (spilled_upto, evicted) each."""
    starts = [session.begin_append(upto) for session, upto in zip(sessions, uptos, strict=True)]
    evictions = [session.eviction(upto) for session, upto in zip(sessions, uptos, strict=True)]
    sums: list[torch.Tensor | None] = [None] * len(sessions)
    groups: dict[tuple, list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.ws.spill_group_key(session.store), []).append(i)
    for members in groups.values():
        want = any(type(sessions[i].policy).wants_evicted_sums and evictions[i][1] > evictions[i][0] for i in members)
        out = WorkingSet.spill_evict_together(
            [sessions[i].ws for i in members], [sessions[i].store for i in members],
            [(starts[i], uptos[i]) for i in members], [evictions[i] for i in members], want,
        )  # fmt: skip
        if out is not None:
            for j, i in enumerate(members):
                sums[i] = out[j]
    selections: list[Selection | None] = [None] * len(sessions)
    by_class: dict[type, list[int]] = {}
    for i, session in enumerate(sessions):
        if evictions[i][1] > evictions[i][0]:
            by_class.setdefault(type(session.policy), []).append(i)
    for cls, members in by_class.items():
        items = [(sessions[i].policy, sessions[i].context(), *evictions[i], sums[i]) for i in members]
        for i, selection in zip(members, cls.on_evict_many(items), strict=True):
            selections[i] = selection
    placed = _place_fills(sessions, selections)
    return [
        session.end_append(upto, low, high, selection, finish=False, noted=True, placed=placement)
        for session, upto, (low, high), selection, placement in zip(
            sessions, uptos, evictions, selections, placed, strict=True
        )
    ]


def _place_fills(sessions: list[Session], selections: list[Selection | None]) -> list[Placement | None]:
    """What the evictions chose (fill_free_slots: after a retrieval under budget, most notices
    place the tokens leaving the window into free retrieved slots), in one launch per group of
    like sessions where there are several; None for the rest (end_append places them)."""
    placed: list[Placement | None] = [None] * len(sessions)
    groups: dict[tuple, list[int]] = {}
    for i, (session, selection) in enumerate(zip(sessions, selections, strict=True)):
        if selection is not None:
            groups.setdefault(session.ws.spill_group_key(session.store), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        placements = WorkingSet.set_retrieved_together(
            [sessions[i].ws for i in members], [sessions[i].store for i in members],
            [selections[i].positions for i in members], [selections[i].units for i in members],
        )  # fmt: skip
        if placements is not None:
            for i, placement in zip(members, placements, strict=True):
                placed[i] = placement
    return placed



def _place(sessions: list[Session], selections: list[Selection | None]) -> list[Placement]:
    """A group's selections into their working sets: in one launch where there are several,
    all chosen (their units device scalars) and placeable together, else one by one."""
    if len(sessions) > 1 and all(s is not None and isinstance(s.units, torch.Tensor) for s in selections):
        placements = WorkingSet.set_retrieved_together(
            [session.ws for session in sessions], [session.store for session in sessions],
            [selection.positions for selection in selections], [selection.units for selection in selections],
        )  # fmt: skip
        if placements is not None:
            for session, placement in zip(sessions, placements, strict=True):
                session.unfinished.append(placement)
            return placements
    return [session.end_boundary(selection, finish=False)[1] for session, selection in zip(sessions, selections, strict=True)]
