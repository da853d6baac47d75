"""The daemon's `cpus` setting: a daemon process runs on those CPUs, an embedded daemon's
threads do while the worker's thread keeps its own, and a CPU set that is not a subset of the
process's is refused naming the setting; `bench e2e --worker-cpus` is checked the same way."""

from __future__ import annotations

import os
import threading

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from kvrecall.server.config import ConfigError, load_config
from kvrecall.server.embedded import EmbeddedDaemon

ALLOWED = sorted(os.sched_getaffinity(0))
TWO_CPUS = pytest.mark.skipif(len(ALLOWED) < 2, reason="needs a process allowed on two CPUs")


@pytest.mark.parametrize("bad", ["x", "3-1", "-1", f"{max(ALLOWED) + 1}", f"0-{max(ALLOWED) + 64}"])
def test_a_cpu_set_outside_the_process_is_refused_naming_cpus(bad):
    with pytest.raises(ConfigError, match="cpus"):
        load_config(overrides={"cpus": bad})


@TWO_CPUS
def test_an_embedded_daemons_threads_run_on_its_cpus_and_the_workers_keeps_its_own():
    mine, theirs = os.sched_getaffinity(0), {ALLOWED[-1]}
    with EmbeddedDaemon(host_pool_gb=0.25, device_pool_gb=0.25, env={"KVRECALL_CPUS": str(ALLOWED[-1])}) as daemon:
        with KVRecallClient(daemon.target, "cpus") as client:
            assert client.stats() is not None
        daemon_threads = [t for t in threading.enumerate() if t is daemon._thread or t.name.startswith("kvrecall-daemon")]
        assert daemon_threads and all(os.sched_getaffinity(t.native_id) == theirs for t in daemon_threads)
        assert os.sched_getaffinity(0) == mine


@TWO_CPUS
def test_a_daemon_process_runs_on_its_cpus():
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.25, env={"KVRECALL_CPUS": str(ALLOWED[0])}) as daemon:
        assert os.sched_getaffinity(daemon.process.pid) == {ALLOWED[0]}
        assert f"run on CPUs {ALLOWED[0]}" in daemon.log()


def test_bench_e2e_refuses_worker_cpus_outside_the_process():
    from kvrecall.cli import main

    with pytest.raises(SystemExit, match="--worker-cpus: CPUs .* are not among this process's"):
        main(["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--worker-cpus", f"{max(ALLOWED) + 1}"])
