"""Starting tensor-parallel ranks and their daemons on one host (tests, benchmarks).

`rank_daemons` starts one real `kvrecall serve` per rank (cpu, or cuda:r for rank r);
`run_ranks` starts `python -m MODULE` once per rank with torchrun's variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and waits for all of them. If one rank
fails, the others are stopped (they would wait for it in their next collective).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from kvrecall.local import LocalDaemon


class RankFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def rank_daemons(
    world: int, device: str, log_dir: Path, host_pool_gb: float = 0.5, device_pool_gb: float = 0.25
) -> Iterator[list[LocalDaemon]]:
    """One daemon per rank: on `device` "cpu" all run on the CPU, on "cuda" daemon r owns cuda:r."""
    log_dir.mkdir(parents=True, exist_ok=True)
    daemons = [
        LocalDaemon(
            host_pool_gb=host_pool_gb,
            device_pool_gb=device_pool_gb,
            device="cpu" if device == "cpu" else f"cuda:{rank}",
            log_path=str(log_dir / f"daemon{rank}.log"),
        )
        for rank in range(world)
    ]
    started: list[LocalDaemon] = []
    try:
        for daemon in daemons:
            started.append(daemon.start(timeout=120.0))
        yield daemons
    finally:
        for daemon in started:
            daemon.stop()


def run_ranks(
    module: str,
    args: Sequence[str] | Callable[[int], Sequence[str]],
    world: int,
    log_dir: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run `python -m module *args` as ranks 0..world-1 (`args(rank)` when each rank needs its
    own); return each rank's output, or raise RankFailed with the failing rank's log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs: list[tuple[subprocess.Popen, Path]] = []
    for rank in range(world):
        rank_env = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONUNBUFFERED": "1",
        }
        log = log_dir / f"{module.rsplit('.', 1)[-1]}-w{world}-rank{rank}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *(args(rank) if callable(args) else args)],
                env=rank_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        procs.append((proc, log))
    deadline = time.monotonic() + timeout
    failed: tuple[int, int | None, Path] | None = None
    while failed is None and any(p.poll() is None for p, _ in procs):
        for rank, (proc, log) in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0):
                failed = (rank, code, log)
        if failed is None and time.monotonic() > deadline:
            failed = (-1, None, procs[0][1])
        time.sleep(0.1)
    for rank, (proc, log) in enumerate(procs):
        if failed is None and proc.returncode not in (None, 0):
            failed = (rank, proc.returncode, log)
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if failed is not None:
        rank, code, log = failed
        what = f"timed out after {timeout:.0f}s" if rank < 0 else f"rank {rank} exited with {code}"
        raise RankFailed(f"{module}: {what}; {log}:\n{log.read_text(errors='replace')[-4000:]}")
    return [log.read_text(errors="replace") for _, log in procs]
