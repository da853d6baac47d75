"""The queue of retrieving calls (kvrecall/server/coalesce.py): calls that arrive while a run is
under way are served by the next run, together, each getting its own outcomes; runs keep
`background` apart and `max_events` bounds them; a call cancelled while queued never runs, one
cancelled mid-run waits for the run; a failed run fails its calls and the queue goes on.
The run here stands in for serve_step (whose batches tests/integration/test_boundaries_coalesced.py
checks through a real daemon): it records what it was given and finishes when told."""

from __future__ import annotations

import asyncio

import pytest

from kvrecall.server.coalesce import Coalescer
from kvrecall.server.step_batch import StepOutcome, StepTiming


class Runs:
    """A run per call of the coalescer: records (sessions, events, background), answers each
    event e with StepOutcome(append=(e, e)) once `finish(k)` opens run k, or raises."""

    def __init__(self) -> None:
        self.seen: list[tuple[list, list, bool]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: set[int] = set()
        self.ended: list[int] = []

    async def __call__(self, sessions, events, background, timing: StepTiming):
        k = len(self.seen)
        self.seen.append((list(sessions), list(events), background))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        self.ended.append(k)
        if k in self.fail:
            raise RuntimeError(f"run {k} broke")
        return [StepOutcome(append=(e, e)) for e in events], len(set(sessions))

    async def started(self, count: int) -> None:
        while len(self.seen) < count:
            await asyncio.sleep(0)

    def finish(self, k: int) -> None:
        self.gates[k].set()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_calls_that_arrive_during_a_run_are_served_together_by_the_next():
    async def main():
        runs, sizes = Runs(), []
        coalescer = Coalescer(runs, on_run=sizes.append)
        first = asyncio.ensure_future(coalescer.serve(["a"], [1], True))
        await runs.started(1)
        later = [asyncio.ensure_future(coalescer.serve([s], events, True))
                 for s, events in (("b", [2, 3]), ("c", [4]), ("d", [5, 6, 7]))]  # fmt: skip
        while coalescer.queued < 3:
            await asyncio.sleep(0)
        assert len(runs.seen) == 1, "the later calls wait for the run under way"
        runs.finish(0)
        lone = await first
        await runs.started(2)
        assert runs.seen[1] == (["b", "c", "d"], [2, 3, 4, 5, 6, 7], True)
        runs.finish(1)
        served = [await call for call in later]
        assert [lone.calls, *(s.calls for s in served)] == [1, 3, 3, 3]
        assert [o.append[0] for o in lone.outcomes] == [1]
        assert [[o.append[0] for o in s.outcomes] for s in served] == [[2, 3], [4], [5, 6, 7]]
        assert [s.reports_phases for s in served] == [True, False, False]
        assert served[0].timing is served[2].timing and served[0].groups == 3
        assert sizes == [1, 3]

    run(main())


def test_runs_keep_background_apart_and_stay_under_max_events():
    async def main():
        runs = Runs()
        coalescer = Coalescer(runs, max_events=4)
        first = asyncio.ensure_future(coalescer.serve(["a"], [0], True))
        await runs.started(1)
        calls = [asyncio.ensure_future(coalescer.serve([s], events, background))
                 for s, events, background in (("b", [1, 2], True), ("c", [3], False), ("d", [4, 5], True),
                                               ("e", [6, 7, 8, 9, 10], True), ("f", [11], False))]  # fmt: skip
        while coalescer.queued < 5:
            await asyncio.sleep(0)
        runs.finish(0)
        for k in range(1, 4):
            await runs.started(k + 1)
            runs.finish(k)
        await asyncio.gather(first, *calls)
        assert [(seen[0], seen[2]) for seen in runs.seen] == [
            (["a"], True),
            (["b", "d"], True),  # c is not background; e would take the run past 4 events
            (["c", "f"], False),
            (["e"], True),  # more than max_events alone: it still runs
        ]

    run(main())


def test_a_call_cancelled_while_queued_never_runs():
    async def main():
        runs = Runs()
        coalescer = Coalescer(runs)
        first = asyncio.ensure_future(coalescer.serve(["a"], [1], True))
        await runs.started(1)
        gone = asyncio.ensure_future(coalescer.serve(["b"], [2], True))
        kept = asyncio.ensure_future(coalescer.serve(["c"], [3], True))
        while coalescer.queued < 2:
            await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert coalescer.queued == 1
        runs.finish(0)
        await first
        await runs.started(2)
        runs.finish(1)
        assert [o.append[0] for o in (await kept).outcomes] == [3]
        assert [seen[0] for seen in runs.seen] == [["a"], ["c"]]

    run(main())


def test_a_call_cancelled_during_its_run_waits_for_the_run():
    async def main():
        runs = Runs()
        coalescer = Coalescer(runs)
        call = asyncio.ensure_future(coalescer.serve(["a"], [1], True))
        await runs.started(1)
        call.cancel()
        for _ in range(20):
            await asyncio.sleep(0)
        assert not call.done(), "the run still reads the call's sessions"
        runs.finish(0)
        with pytest.raises(asyncio.CancelledError):
            await call
        assert runs.ended == [0]

    run(main())


def test_a_failed_run_fails_its_calls_and_the_queue_goes_on():
    async def main():
        runs = Runs()
        runs.fail.add(1)
        coalescer = Coalescer(runs)
        first = asyncio.ensure_future(coalescer.serve(["a"], [1], True))
        await runs.started(1)
        doomed = [asyncio.ensure_future(coalescer.serve([s], [e], True)) for s, e in (("b", 2), ("c", 3))]
        while coalescer.queued < 2:
            await asyncio.sleep(0)
        runs.finish(0)
        await first
        await runs.started(2)
        after = asyncio.ensure_future(coalescer.serve(["d"], [4], True))
        while coalescer.queued < 1:
            await asyncio.sleep(0)
        runs.finish(1)
        for call in doomed:
            with pytest.raises(RuntimeError, match="run 1 broke"):
                await call
        await runs.started(3)
        runs.finish(2)
        assert [o.append[0] for o in (await after).outcomes] == [4]

    run(main())


def test_max_events_must_be_positive():
    with pytest.raises(ValueError, match="max_events"):
        Coalescer(Runs(), max_events=0)
