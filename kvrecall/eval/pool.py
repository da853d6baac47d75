"""Running eval work units: a schedule with priorities and a deadline, executed by one in-process
Runner or by N worker subprocesses that each load the model (``--workers N``).

On a GPU one decode step of the 135M-parameter test model is bound by Python and kernel
launches, not by the GPU, so several processes sharing the GPU (and one daemon) finish a suite
several times sooner. Units and results cross the process boundary as JSON lines on the
worker's stdin/stdout: nothing is pickled.

Ownership: the pool starts its subprocesses and ends them (close, then terminate) on exit.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

Executor = Callable[[dict], dict]


class Schedule:
    """Units by priority (lower first), follow-up units released by results, and a deadline after
    which no unit starts. Thread-safe: executors take units and report results concurrently."""

    def __init__(self, deadline: float | None = None, abandon_at: float | None = None) -> None:
        self.deadline = deadline  # time.monotonic() value after which no unit starts, or None
        self.abandon_at = abandon_at  # time.time() value stamped on units: running ones give up then
        self._heap: list[tuple[float, int, dict]] = []
        self._order = itertools.count()
        self._running = 0
        self._cond = threading.Condition()
        self.done = 0
        self.skipped: list[str] = []
        self.errors: list[dict] = []

    def add(self, units: Iterable[tuple[float, dict]]) -> None:
        with self._cond:
            for priority, unit in units:
                heapq.heappush(self._heap, (priority, next(self._order), unit))
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return len(self._heap)

    def take(self) -> dict | None:
        """The next unit; waits while others run units that may release more; None when done."""
        with self._cond:
            while True:
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.skipped += [u["id"] for _, _, u in self._heap]
                    self._heap.clear()
                if self._heap:
                    self._running += 1
                    unit = heapq.heappop(self._heap)[2]
                    return unit if self.abandon_at is None else {**unit, "abandon_at": self.abandon_at}
                if self._running == 0:
                    self._cond.notify_all()
                    return None
                self._cond.wait(timeout=1.0)

    def finish(self, handle: Callable[[dict], Iterable[tuple[float, dict]]], result: dict) -> None:
        """Record ``result`` and queue the units ``handle(result)`` releases."""
        with self._cond:
            self._running -= 1
            self.done += 1
            if result.get("kind") == "error":
                self.errors.append(result)
            elif result.get("kind") == "abandoned":
                self.skipped.append(result["id"])
            else:
                for priority, unit in handle(result):
                    heapq.heappush(self._heap, (priority, next(self._order), unit))
            self._cond.notify_all()


def run(
    schedule: Schedule, executors: list[Executor], handle: Callable[[dict], Iterable[tuple[float, dict]]]
) -> None:
    """Drain ``schedule`` with one thread per executor; ``handle`` sees every result (under the
    schedule's lock) and returns follow-up units."""

    def loop(execute: Executor) -> None:
        while (unit := schedule.take()) is not None:
            try:
                result = execute(unit)
            except Exception as exc:  # a failed unit is reported, the others go on
                result = {"kind": "error", "id": unit["id"], "error": f"{type(exc).__name__}: {exc}"}
            schedule.finish(handle, result)

    threads = [threading.Thread(target=loop, args=(e,), daemon=True) for e in executors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class WorkerProcess:
    """One ``python -m kvrecall.eval.pool`` subprocess: a unit per stdin line, a result per
    stdout line. Its stderr goes to ``log_path``."""

    def __init__(self, target: str, device: str, log_path: Path, threads: int) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvrecall.eval.pool",
                "--target",
                target,
                "--device",
                device,
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def execute(self, unit: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(unit) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            tail = self.log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"eval worker exited with {self.process.wait()}: {tail}")
        return json.loads(line)

    def close(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait()
        self._log.close()


def _serve(stream_in: IO[str], stream_out: IO[str], execute: Executor) -> None:
    for line in stream_in:
        unit = json.loads(line)
        try:
            result = execute(unit)
        except Exception as exc:
            result = {"kind": "error", "id": unit.get("id"), "error": f"{type(exc).__name__}: {exc}"}
        stream_out.write(json.dumps(result) + "\n")
        stream_out.flush()


def main(argv: list[str] | None = None) -> int:
    """Worker subprocess: load the model on ``--device``, connect to ``--target``, serve units."""
    parser = argparse.ArgumentParser(prog="python -m kvrecall.eval.pool")
    parser.add_argument("--target", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of this worker")
    args = parser.parse_args(argv)
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # libraries that print must not corrupt the result stream
    sys.stdout = sys.stderr

    import torch

    from kvrecall.client import KVRecallClient
    from kvrecall.eval.runner import Runner
    from kvrecall.models.smollm import load_model

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(0)
    model, tokenizer = load_model(device=args.device)
    with KVRecallClient(args.target, f"eval-worker-{os.getpid()}") as client:
        _serve(sys.stdin, results, Runner(model, tokenizer, client).execute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
