"""A Boundaries call: one decode step's AppendNotices and retrievals of many sessions at once.

The batched engine sends every slot that crossed a boundary in a step (and every notice that
fell due) in one message. Here, in one worker thread, holding every session's `busy` lock:

1. the notices, session by session (each spills its own ring to its own host pages);
2. the retrievals, grouped by policy class and `Policy.batch_key()`: a group is scored,
   selected and expanded together (`Policy.on_boundaries`: louiskv and quest stack their
   sessions' tables; the other policies serve their sessions one by one);
3. each selection is placed into its session's working set (a gather per session);
4. one sync of the daemon's stream for all of them, then each session accounts its work.

The service validates every event before this runs (`check_events`), so a bad event refuses
the whole call and no session changes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kvrecall.server.errors import FailedPrecondition, InvalidArgument
from kvrecall.server.session import Session, check_append_upto, check_boundary_position
from kvrecall.server.working_set import Placement
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


def serve_step(sessions: list[Session], events: list[pb.StepEvent]) -> tuple[list[StepOutcome], int]:
    """Run a validated Boundaries call (module docstring) -> (one outcome per event, groups)."""
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
            for i, selection in zip(members, selections, strict=True):
                outcomes[i].placement = sessions[i].end_boundary(selection, finish=False)[1]
        device = sessions[0].ws.keys.device if sessions else None
        if device is not None and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        for session in sessions:
            session.finish()
    return outcomes, len(groups)
