"""profile_out: a daemon profiles its Boundaries work and writes the busiest functions of its
notice-only calls and of its retrieving calls at shutdown."""

from __future__ import annotations

import json

from kvrecall.client import KVRecallClient, StepCall
from kvrecall.local import LocalDaemon
from tests.conftest import random_kv
from tests.integration.test_boundaries_batch import CASES, SPEC, open_ingested, write_step


def two_notices_then_a_retrieval(daemon: LocalDaemon):
    """One louiskv session: two Boundaries calls of one AppendNotice each, then one that
    retrieves (its BoundariesResponse returned)."""
    with KVRecallClient(daemon.target, "profiled", timeout=30.0) as client:
        session = open_ingested(client, "louiskv", CASES[0][1], 150, 1)
        kv = random_kv(SPEC, 200, 1)
        notices = 0
        while notices < 2:
            write_step(session, kv, session.query.clone())
            if session.core.needs_append():
                client.boundaries([StepCall(session, session.core.position, notice=True)])
                notices += 1
        response = client.boundaries([StepCall(session, session.core.position, retrieve=True)])
        session.close()
    return response


def test_a_daemon_writes_the_profile_of_its_boundaries_work_at_shutdown(tmp_path):
    path = tmp_path / "profile.json"
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={"KVRECALL_PROFILE_OUT": str(path)}) as daemon:
        two_notices_then_a_retrieval(daemon)
        assert not path.exists()  # written at shutdown
    profile = json.loads(path.read_text())
    assert profile["notices"]["calls"] == 2 and profile["retrievals"]["calls"] == 1
    for kind in ("notices", "retrievals"):
        top = profile[kind]["top"]
        assert top and all(row["own_ms_per_call"] >= 0 and row["calls_per_call"] > 0 for row in top)


def test_a_call_while_another_is_profiled_runs_unprofiled_and_is_counted(tmp_path):
    """One profiler per interpreter at a time (Python 3.12): the second call still runs."""
    import threading

    from kvrecall.server.profiling import OpsProfiler

    profiler = OpsProfiler(str(tmp_path / "p.json"))
    inside, release = threading.Event(), threading.Event()

    def slow() -> int:
        inside.set()
        release.wait(10)
        return 1

    first = threading.Thread(target=profiler.run, args=("notices", slow))
    first.start()
    assert inside.wait(10)
    assert profiler.run("notices", lambda: 2) == 2  # while the first is profiled
    release.set()
    first.join()
    summary = profiler.summary()["notices"]
    assert (summary["calls"], summary["skipped"]) == (1, 1)


def test_the_kernel_profile_of_a_cpu_daemon_says_there_was_nothing_to_profile(tmp_path):
    path = tmp_path / "kernels.json"
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={"KVRECALL_KERNEL_PROFILE_OUT": str(path)}):
        pass
    profile = json.loads(path.read_text())
    assert profile["device"] == "cpu" and profile["kernels"] == [] and "no CUDA device" in profile["note"]


def test_a_kernel_profile_window_is_written_once():
    """begin() on a CPU device does nothing; finish() writes the note, a second finish nothing."""
    import os
    import tempfile

    import torch

    from kvrecall.server.profiling import KernelProfiler

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.json")
        profiler = KernelProfiler(path, torch.device("cpu"), seconds=0.01)
        profiler.begin()
        profiler.finish()
        first = os.stat(path).st_mtime_ns
        os.utime(path, ns=(0, 0))
        profiler.finish()
        assert os.stat(path).st_mtime_ns == 0 != first


def test_busy_time_counts_overlapping_kernels_once():
    from kvrecall.server.profiling import union_length

    assert union_length([]) == 0.0
    assert union_length([(0.0, 4.0), (1.0, 2.0), (3.0, 6.0), (10.0, 11.0)]) == 7.0
    assert union_length([(5.0, 6.0), (0.0, 1.0)]) == 2.0


def test_the_busy_timeline_splits_intervals_at_bucket_edges():
    from kvrecall.server.profiling import busy_per_bucket

    assert busy_per_bucket([], 1.0) == []
    # from 10: [10, 10.5) and [10.25, 11.5) join to [10, 11.5); [13, 13.25)
    assert busy_per_bucket([(10.0, 10.5), (10.25, 11.5), (13.0, 13.25)], 1.0) == [1.0, 0.5, 0.0, 0.25]


def test_a_daemon_writes_its_boundaries_calls_phases_at_shutdown(tmp_path):
    """phases_out: per kind of call, the mean and quantiles of each phase (kvrecall/phases.py); the
    phases of a call add up to at most its time in the daemon."""
    path = tmp_path / "phases.json"
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={"KVRECALL_PHASES_OUT": str(path)}) as daemon:
        response = two_notices_then_a_retrieval(daemon)
    phases = json.loads(path.read_text())
    assert phases["notices"]["calls"] == 2 and phases["retrievals"]["calls"] == 1
    retrieval = phases["retrievals"]["phases"]
    assert set(retrieval) == set(phases["phases"])
    for name in ("locks", "select", "place", "sync", "finish"):  # the phases every retrieval passes
        assert retrieval[name]["max"] > 0, name
    assert retrieval["notices"]["max"] == 0  # a retrieval alone sent no notice
    assert phases["notices"]["phases"]["select"]["max"] == 0 and phases["notices"]["phases"]["notices"]["max"] > 0
    assert phases["retrievals"]["total_ms_mean"] <= response.seconds * 1e3


def test_phase_marks_without_a_running_clock_do_nothing_and_nested_clocks_restore():
    from kvrecall import phases

    phases.mark("gather")  # no clock on this thread: nothing to add to
    outer, inner = phases.PhaseClock(), phases.PhaseClock()
    with phases.running(outer):
        with phases.running(inner):
            phases.mark("select")
        phases.mark("sync")
    assert set(inner.seconds) == {"select"} and set(outer.seconds) == {"sync"}


def test_cuda_events_split_kernels_from_copies_and_skip_host_events():
    from types import SimpleNamespace

    import torch

    from kvrecall.server.profiling import cuda_events

    def event(name, start, end, device=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    spans, kernels, copies = cuda_events([
        event("k", 0, 5), event("k", 10, 12), event("Memcpy HtoD", 3, 9), event("Memset", 1, 2),
        event("aten::add", 0, 100, torch.autograd.DeviceType.CPU), event("j", 4, 7),
    ])  # fmt: skip
    assert spans == [(0, 5), (10, 12), (4, 7)]
    assert kernels == {"k": [5, 2], "j": [3]}
    assert copies == {"Memcpy HtoD": [6], "Memset": [1]}


def test_kernel_gaps_split_steps_from_launch_gaps_and_name_the_pairs():
    from kvrecall.server.profiling import kernel_gaps

    # two steps: a (0-10), b (11-20) with a 1 us gap, c (23-30) after 3 us, a kernel d inside c
    # (no gap); then 500 us of host time; the second step the same with b -> c 10 us apart
    one = [(0.0, 10.0, "a"), (11.0, 20.0, "b"), (23.0, 30.0, "c"), (24.0, 26.0, "d")]
    two = [(530.0, 540.0, "a"), (541.0, 550.0, "b"), (560.0, 570.0, "c")]
    out = kernel_gaps(one + two, steps=2)
    assert out["between_steps_ms_per_step"] == 0.25  # 500 us over 2 steps
    assert out["gaps_per_step"] == 2.0
    assert out["gap_ms_per_step"] == round((1 + 3 + 1 + 10) / 1e3 / 2, 4)
    assert out["gaps_by_us_per_step"] == {"0-1": 0.0, "1-2": 1.0, "2-5": 0.5, "5-20": 0.5, "20-200": 0.0}
    top = out["top_pairs"][0]
    assert (top["before"], top["after"], top["us_per_step"], top["per_step"]) == ("b", "c", 6.5, 1.0)
    # a kernel that ends before an earlier one still runs is not where a gap starts
    nested = kernel_gaps([(0.0, 10.0, "long"), (2.0, 3.0, "short"), (12.0, 13.0, "next")], steps=1)
    assert nested["top_pairs"][0]["before"] == "long" and nested["gap_ms_per_step"] == 0.002
