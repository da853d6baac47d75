"""Retrieving Boundaries calls served together (`coalesce_retrievals`, issue #17).

With a lag the engine sends each step's crossings in one background call and decodes on, so
its calls overlap in the daemon: at 32K x 8 on an H200 a call was answered in ~24 ms while one
came every ~9 ms step, so two or three ran at once, each in a thread of its own. Their Python
took turns at the interpreter lock, their kernels shared the device's stream, and each one's
last sync waited for the others' work too.

Here a retrieving call hands its checked (sessions, events) to a `Coalescer` and waits. While
no run is under way the call starts one at once; calls that arrive meanwhile queue, and the
next run serves all of them (up to `max_events` events) as one `serve_step`: one selection per
policy group, one placement launch, one sync (server/step_batch.py). Each call gets its own
events' outcomes back, in its order. Who owns what: a queued call still holds its sessions'
locks (the RPC's), so no session is in two queued calls and no other RPC touches it; a run
only takes the sessions' `busy` locks, as a lone call does.

A call cancelled while queued leaves the queue; one cancelled after its run began waits for
the run (its tensors and locks must outlive it). A run that fails fails every call in it
(their events were checked before they queued, so what is left is the daemon's own trouble,
as for a lone call of many sessions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kvrecall.server.session import Session
from kvrecall.server.step_batch import StepOutcome, StepTiming
from kvrecall.v1 import kvrecall_pb2 as pb

# (sessions, events, background, timing) -> (outcomes, groups), awaited: the service runs
# serve_step in a worker thread.
Run = Callable[[list[Session], list[pb.StepEvent], bool, StepTiming], Awaitable[tuple[list[StepOutcome], int]]]


@dataclass
class Served:
    """One call's share of a run: its outcomes (one per event, in its order), the run's policy
    groups and timing, how many calls the run served, and whether this call reports the
    run's phases (only the first of a run, so a histogram counts each run once)."""

    outcomes: list[StepOutcome]
    groups: int
    timing: StepTiming
    calls: int
    reports_phases: bool


@dataclass
class _Call:
    sessions: list[Session]
    events: list[pb.StepEvent]
    background: bool
    future: asyncio.Future


class Coalescer:
    """Serves the retrieving calls of one daemon, one run at a time (module docstring).
    `on_run(calls)` is told each run's size (the daemon's histogram)."""

    def __init__(self, run: Run, max_events: int = 256, on_run: Callable[[int], None] | None = None) -> None:
        if max_events < 1:
            raise ValueError(f"max_events: {max_events} must be >= 1")
        self._run = run
        self.max_events = max_events
        self._on_run = on_run
        self._queue: list[_Call] = []
        self._runner: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Calls waiting for the next run."""
        return len(self._queue)

    async def serve(self, sessions: list[Session], events: list[pb.StepEvent], background: bool) -> Served:
        """Queue a checked call, wait for the run that serves it, return its share."""
        call = _Call(sessions, list(events), background, asyncio.get_running_loop().create_future())
        self._queue.append(call)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._drain())
        try:
            return await asyncio.shield(call.future)
        except asyncio.CancelledError:
            if call in self._queue:  # not started: nothing of it ran
                self._queue.remove(call)
                raise
            while not call.future.done():  # its run holds its sessions' tensors: wait for it
                try:
                    await asyncio.wait({call.future})
                except asyncio.CancelledError:
                    continue
            if not call.future.cancelled():
                call.future.exception()  # retrieved: the caller is gone
            raise

    def _take(self) -> list[_Call]:
        """The next run's calls: the first queued, then those of the same `background` after it
        while the events fit in max_events (the first always goes, however many it has)."""
        first = self._queue[0]
        batch, events = [first], len(first.events)
        for call in self._queue[1:]:
            if call.background == first.background and events + len(call.events) <= self.max_events:
                batch.append(call)
                events += len(call.events)
        self._queue = [call for call in self._queue if call not in batch]
        return batch

    async def _drain(self) -> None:
        while self._queue:
            batch = self._take()
            if self._on_run is not None:
                self._on_run(len(batch))
            timing = StepTiming()
            sessions = [session for call in batch for session in call.sessions]
            events = [event for call in batch for event in call.events]
            try:
                outcomes, groups = await self._run(sessions, events, batch[0].background, timing)
            except BaseException as exc:  # noqa: BLE001 (every caller gets it; the loop serves the rest)
                for call in batch:
                    if not call.future.done():
                        call.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            start = 0
            for k, call in enumerate(batch):
                share = outcomes[start : start + len(call.events)]
                start += len(call.events)
                if not call.future.done():
                    call.future.set_result(Served(share, groups, timing, len(batch), k == 0))
