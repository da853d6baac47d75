"""`kvrecall soak`: N concurrent sessions x M decode steps of synthetic KV against one daemon.

Each session runs in its own thread with its own client (worker id `soak-<i>`), as a model
worker would: ingest a random prompt, write one random token per step into the working set,
AppendNotice every `spill_every` tokens, BoundaryEvents as the policy's rule asks (louiskv:
every ~10 steps; quest: every step; streaming: never), and close + reopen the session every
`--reopen-every` steps. Policies and transports rotate over the sessions (louiskv/shm,
streaming/shm, quest/shm, louiskv/inline).

A sampler records, over time, the steps done, the open sessions, the pools' used bytes
(GetStats) and the daemon's RSS (psutil if installed, else /proc/<pid>/status; the daemon's
pid is known when the soak starts it, or given with --daemon-pid; otherwise RSS is skipped).
It prints a table (and with --json one JSON object as the last line). It asserts nothing, but
exits non-zero when the pools are not back to their baseline at the end (1) or a session
thread failed (2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

MiB = 1 << 20

# (policy, config, transport) per session index, round-robin
MIX = [
    ("louiskv", {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8}, "shm"),
    ("streaming", {"n_sink": 4, "window": 32}, "shm"),
    ("quest", {"budget": 48, "n_sink": 4, "window": 32, "page_size": 8}, "shm"),
    ("louiskv", {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8}, "inline"),
]


@dataclass
class SoakConfig:
    sessions: int = 8
    steps: int = 1000             # decode steps per session (over all its reopenings)
    target: str | None = None     # daemon address; None = start a local daemon
    prompt_tokens: int = 128
    reopen_every: int = 250       # close and reopen a session after this many steps
    boundary_every: int = 10      # louiskv-style sessions: a BoundaryEvent every this many steps
    sample_seconds: float = 1.0
    warmup_fraction: float = 0.25  # RSS growth is measured from the first sample past this much work
    seed: int = 0
    daemon_pid: int | None = None
    host_pool_gb: float = 0.5     # local daemon only
    device_pool_gb: float = 0.25
    page_kb: int = 256


@dataclass
class Sample:
    t: float
    steps: int
    sessions: int
    host_used: int
    device_used: int
    rss: int | None
    rss_anon: int | None
    rss_shmem: int | None


@dataclass
class SoakResult:
    config: dict
    seconds: float = 0.0
    total_steps: int = 0
    steps_per_second: float = 0.0
    opened: int = 0
    boundaries: int = 0
    appends: int = 0
    errors: list[str] = field(default_factory=list)
    pool_baseline: dict = field(default_factory=dict)
    pool_end: dict = field(default_factory=dict)
    pool_peak: dict = field(default_factory=dict)
    rss_start: int | None = None
    rss_warm: int | None = None
    rss_end: int | None = None
    rss_max: int | None = None
    rss_anon_start: int | None = None
    rss_anon_warm: int | None = None
    rss_anon_end: int | None = None
    rss_shmem_end: int | None = None
    samples: list[Sample] = field(default_factory=list)

    @property
    def pools_back(self) -> bool:
        return self.pool_end == self.pool_baseline

    @property
    def rss_growth(self) -> int | None:
        """RSS growth after warm-up (bytes)."""
        if self.rss_end is None or self.rss_warm is None:
            return None
        return self.rss_end - self.rss_warm

    @property
    def exit_code(self) -> int:
        if not self.pools_back:
            return 1
        return 2 if self.errors else 0

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(pools_back=self.pools_back, rss_growth=self.rss_growth, exit_code=self.exit_code)
        return data


def process_memory(pid: int | None) -> tuple[int | None, int | None, int | None]:
    """(RSS, anonymous RSS, shared-memory RSS) of `pid` in bytes; None where unknown.

    The host pool and working sets are shared memory: their touched pages count in RSS
    (RssShmem) but are accounted by the pools; heap growth shows in RssAnon."""
    if pid is None:
        return None, None, None
    rss = anon = shmem = None
    try:
        import psutil

        rss = psutil.Process(pid).memory_info().rss
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process may be gone
        return None, None, None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "VmRSS" and rss is None:
                    rss = int(value.split()[0]) * 1024
                elif key == "RssAnon":
                    anon = int(value.split()[0]) * 1024
                elif key == "RssShmem":
                    shmem = int(value.split()[0]) * 1024
    except OSError:
        pass
    return rss, anon, shmem


def _pools(client) -> dict[str, int]:
    return {p.tier: p.used_bytes for p in client.stats().pools}


class _Worker(threading.Thread):
    """One session's life: open, ingest, decode, close; again until `steps` are done."""

    def __init__(self, index: int, target: str, config: SoakConfig, stop: threading.Event) -> None:
        super().__init__(name=f"soak-{index}", daemon=True)
        self.index = index
        self.target = target
        self.config = config
        self.stop_event = stop
        self.steps = 0
        self.opened = 0
        self.boundaries = 0
        self.appends = 0
        self.error: str | None = None

    def run(self) -> None:
        import torch  # here, not at import: `kvrecall --help` / health / stats stay torch-free

        from kvrecall.client import KVRecallClient, ModelSpec
        from kvrecall.v1 import kvrecall_pb2 as pb

        c = self.config
        policy, policy_config, transport = MIX[self.index % len(MIX)]
        spec = ModelSpec(2, 2, 4, 16, torch.float32, c.prompt_tokens + c.reopen_every + 16)
        g = torch.Generator().manual_seed(c.seed * 1000 + self.index)
        # a small pool of random tokens, cycled: cheap steps, still varied keys
        tokens = torch.randn(64, 2, spec.num_layers, spec.num_kv_heads, spec.head_dim, generator=g)
        queries = torch.randn(16, spec.num_layers, spec.num_query_heads, spec.head_dim, generator=g)
        try:
            with KVRecallClient(self.target, f"soak-{self.index}", timeout=60.0) as client:
                while self.steps < c.steps and not self.stop_event.is_set():
                    session = client.open_session(spec, policy, policy_config, transport=transport,
                                                  tag=f"soak-{self.index}")
                    self.opened += 1
                    with session:
                        prompt = torch.randn(2, 2, 2, c.prompt_tokens, 16, generator=g)
                        session.ingest(prompt, queries[0].unsqueeze(2).expand(-1, -1, max(1, session.observation), -1))
                        mode = session.boundary_mode
                        for k in range(min(c.reopen_every, c.steps - self.steps)):
                            if self.stop_event.is_set():
                                break
                            position = c.prompt_tokens + k
                            kv = tokens[(self.index + k) % len(tokens)]
                            session.write_token(position, kv[0], kv[1])
                            if session.advance() is not None:
                                self.appends += 1
                            if mode == pb.BOUNDARY_MODE_EVERY_STEP or (
                                mode == pb.BOUNDARY_MODE_THRESHOLD and (k + 1) % c.boundary_every == 0
                            ):
                                session.query.copy_(queries[(k // c.boundary_every) % len(queries)])
                                session.boundary()
                                self.boundaries += 1
                            self.steps += 1
                        session.flush()
        except Exception as exc:  # noqa: BLE001 - reported, the soak carries on
            self.error = f"soak-{self.index}: {type(exc).__name__}: {exc}"


def run_soak(config: SoakConfig, log=None) -> SoakResult:
    """Run the soak; `log(line)` gets progress lines (default: stderr)."""
    from kvrecall.client import KVRecallClient

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    result = SoakResult(config=asdict(config))
    with contextlib.ExitStack() as stack:
        target, pid = config.target, config.daemon_pid
        if not target:
            from kvrecall.local import LocalDaemon

            daemon = LocalDaemon(
                host_pool_gb=config.host_pool_gb,
                device_pool_gb=config.device_pool_gb,
                extra_args=["--page-kb", str(config.page_kb)],
            )
            stack.enter_context(daemon)
            target, pid = daemon.target, daemon.process.pid
            log(f"soak: local daemon pid {pid} on {target} (log {daemon.log_path}; removed after a clean stop)")
        monitor = stack.enter_context(KVRecallClient(target, "", timeout=30.0))
        result.pool_baseline = _pools(monitor)
        result.pool_peak = dict(result.pool_baseline)
        total = config.sessions * config.steps
        stop = threading.Event()
        workers = [_Worker(i, target, config, stop) for i in range(config.sessions)]
        started = time.monotonic()

        def sample() -> Sample:
            stats = monitor.stats()
            pools = {p.tier: p.used_bytes for p in stats.pools}
            for tier, used in pools.items():
                result.pool_peak[tier] = max(result.pool_peak.get(tier, 0), used)
            rss, anon, shmem = process_memory(pid)
            s = Sample(round(time.monotonic() - started, 2), sum(w.steps for w in workers), len(stats.sessions),
                       pools.get("host", 0), pools.get("device", 0), rss, anon, shmem)
            result.samples.append(s)
            if result.rss_warm is None and s.steps >= config.warmup_fraction * total and s.rss is not None:
                result.rss_warm, result.rss_anon_warm = s.rss, s.rss_anon
            return s

        first = sample()
        result.rss_start, result.rss_anon_start = first.rss, first.rss_anon
        for w in workers:
            w.start()
        next_log = time.monotonic() + 10
        try:
            while any(w.is_alive() for w in workers):
                due = time.monotonic() + config.sample_seconds
                while time.monotonic() < due and any(w.is_alive() for w in workers):
                    time.sleep(min(0.05, config.sample_seconds))
                s = sample()
                if time.monotonic() >= next_log:
                    log(f"soak: {s.t:7.1f}s {s.steps}/{total} steps, {s.sessions} sessions, "
                        f"host {s.host_used / MiB:.1f} MiB, rss {_mib(s.rss)} MiB")
                    next_log = time.monotonic() + 10
        except KeyboardInterrupt:
            stop.set()
            for w in workers:
                w.join()
        result.seconds = time.monotonic() - started
        # every session is closed: the pools must be back (give a reaped straggler a moment)
        deadline = time.monotonic() + 5
        while _pools(monitor) != result.pool_baseline and time.monotonic() < deadline:
            time.sleep(0.2)
        last = sample()
        result.pool_end = {"host": last.host_used, "device": last.device_used}
        result.rss_end, result.rss_anon_end, result.rss_shmem_end = last.rss, last.rss_anon, last.rss_shmem
        if result.rss_warm is None:
            result.rss_warm, result.rss_anon_warm = result.rss_start, result.rss_anon_start
        rss_values = [s.rss for s in result.samples if s.rss is not None]
        result.rss_max = max(rss_values) if rss_values else None
        result.total_steps = sum(w.steps for w in workers)
        result.steps_per_second = result.total_steps / max(result.seconds, 1e-9)
        result.opened = sum(w.opened for w in workers)
        result.boundaries = sum(w.boundaries for w in workers)
        result.appends = sum(w.appends for w in workers)
        result.errors = [w.error for w in workers if w.error]
    return result


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def format_table(result: SoakResult, max_rows: int = 30) -> str:
    samples = result.samples
    if len(samples) > max_rows:
        step = (len(samples) - 1) / (max_rows - 1)
        samples = [samples[round(i * step)] for i in range(max_rows)]
    lines = [f"{'t (s)':>8} {'steps':>9} {'sessions':>8} {'host MiB':>9} {'device MiB':>10} {'RSS MiB':>8} "
             f"{'anon MiB':>8} {'shmem MiB':>9}"]
    for s in samples:
        lines.append(f"{s.t:8.1f} {s.steps:9d} {s.sessions:8d} {s.host_used / MiB:9.2f} {s.device_used / MiB:10.2f} "
                     f"{_mib(s.rss):>8} {_mib(s.rss_anon):>8} {_mib(s.rss_shmem):>9}")
    c = result.config
    lines.append("")
    lines.append(
        f"{c['sessions']} sessions x {c['steps']} steps: {result.total_steps} steps in {result.seconds:.1f}s "
        f"({result.steps_per_second:.0f} steps/s), {result.opened} sessions opened, {result.boundaries} boundaries, "
        f"{result.appends} appends"
    )
    lines.append(f"pools: baseline {result.pool_baseline}, peak {result.pool_peak}, end {result.pool_end} -> "
                 f"{'back to baseline' if result.pools_back else 'NOT BACK TO BASELINE'}")
    if result.rss_start is not None:
        lines.append(
            f"daemon RSS: start {_mib(result.rss_start)} MiB, after warm-up {_mib(result.rss_warm)} MiB, "
            f"end {_mib(result.rss_end)} MiB, max {_mib(result.rss_max)} MiB (growth after warm-up "
            f"{_mib(result.rss_growth)} MiB); anonymous {_mib(result.rss_anon_start)} -> "
            f"{_mib(result.rss_anon_warm)} -> {_mib(result.rss_anon_end)} MiB; shared memory at the end "
            f"{_mib(result.rss_shmem_end)} MiB"
        )
    else:
        lines.append("daemon RSS: not sampled (remote daemon; pass --daemon-pid to sample a local one)")
    for error in result.errors:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    config = SoakConfig(
        sessions=args.sessions,
        steps=args.steps,
        target=args.target,
        reopen_every=args.reopen_every,
        sample_seconds=args.sample_seconds,
        seed=args.seed,
        daemon_pid=args.daemon_pid,
    )
    if config.sessions < 1 or config.steps < 1 or config.reopen_every < 1:
        print("kvrecall soak: --sessions, --steps and --reopen-every must be >= 1", file=sys.stderr)
        return 2
    result = run_soak(config)
    print(format_table(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result.to_json()))
    return result.exit_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (threads)")
    parser.add_argument("--steps", type=int, default=1000, help="decode steps per session")
    parser.add_argument("--target", help="daemon address (default: start a local daemon)")
    parser.add_argument("--reopen-every", type=int, default=250, help="close and reopen sessions after this many steps")
    parser.add_argument("--sample-seconds", type=float, default=1.0, help="sampling interval")
    parser.add_argument("--daemon-pid", type=int, help="sample this process's RSS (with --target)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV and queries (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
