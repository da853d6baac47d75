"""A Boundaries call: one decode step's AppendNotices and retrievals of many sessions at once.

The batched engine sends every slot that crossed a boundary in a step (and every notice that
fell due) in one message. Here, in one worker thread, holding every session's `busy` lock:

1. the notices, session by session (each spills its own ring to its own host pages);
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
from dataclasses import dataclass

import torch

from kvrecall import kernels
from kvrecall.server.errors import FailedPrecondition, InvalidArgument
from kvrecall.server.policies.base import Selection
from kvrecall.server.session import Session, check_append_upto, check_boundary_position
from kvrecall.server.working_set import Placement, WorkingSet
from kvrecall.v1 import kvrecall_pb2 as pb


@dataclass
class StepOutcome:
    """What one event did: its notice's (spilled_upto, evicted), its retrieval's placement."""

    append: tuple[int, int] | None = None
    placement: Placement | None = None


def check_events(sessions: list[Session], events: list[pb.StepEvent]) -> None:
    """Every event against its session's state (under the sessions' locks): InvalidArgument /
    FailedPrecondition naming events[i] and the field."""
    for i, (session, event) in enumerate(zip(sessions, events, strict=True)):
        where = f"events[{i}]"
        if not (event.notice or event.retrieve):
            raise InvalidArgument(f"{where}.notice", "an event needs notice or retrieve (or both)")
        if not session.ingested:
            raise FailedPrecondition(f"{where}: session {session.session_id} has not ingested its prompt")
        if event.notice:
            check_append_upto(session, event.position, f"{where}.position")
        elif event.retrieve:
            check_boundary_position(session, event.position, f"{where}.position")


def serve_step(
    sessions: list[Session], events: list[pb.StepEvent], background: bool = False
) -> tuple[list[StepOutcome], int]:
    """Run a validated Boundaries call (module docstring) -> (one outcome per event, groups).
    `background` (BoundariesRequest.background): the retrievals' placements are background ones
    (kernels.background_reads: under host_reads=copy their rows go by the copy engine)."""
    outcomes = [StepOutcome() for _ in events]
    with contextlib.ExitStack() as held:
        for session in sorted(sessions, key=lambda s: s.session_id):
            held.enter_context(session.busy)
        for session in sessions:
            if session.closed:
                raise InvalidArgument("session_id", f"session {session.session_id!r} was closed")
        for outcome, session, event in zip(outcomes, sessions, events, strict=True):
            if event.notice:
                outcome.append = session.append(event.position, None, finish=False)
        groups: dict[object, list[int]] = {}
        for i, (session, event) in enumerate(zip(sessions, events, strict=True)):
            if event.retrieve:
                key = session.policy.batch_key()
                groups.setdefault((type(session.policy), key) if key is not None else ("alone", i), []).append(i)
        for members in groups.values():
            items = []
            for i in members:
                session = sessions[i]
                query = session.begin_boundary(events[i].position, [], None)
                items.append((session.policy, session.context(), query))
            selections = type(items[0][0]).on_boundaries(items)
            with kernels.background_reads() if background else contextlib.nullcontext():
                placements = _place([sessions[i] for i in members], selections)
            for i, placement in zip(members, placements, strict=True):
                outcomes[i].placement = placement
        device = sessions[0].ws.keys.device if sessions else None
        if device is not None and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        for session in sessions:
            session.finish(synced=True)  # the one sync above covered every session's work
    return outcomes, len(groups)


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
