"""Smoke test of ``python -m kvrecall.bench --quick``: tiny shapes, runs on a CPU in seconds.

It runs the benchmark as a subprocess (the benchmark sets process-wide torch state) and checks
that the JSON has every part, positive numbers where something was measured, and passing
correctness checks. A second run exercises the Triton kernels under the interpreter.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("full", "bound", "louiskv", "perstep-host-a", "perstep-host-b")


def run_bench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "kvrecall.bench", "--quick", "--out", str(out), *args],
                          cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== decode step ms" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.timeout(120)
def test_quick_run_writes_every_part(tmp_path: Path) -> None:
    results = run_bench(tmp_path)
    for key in ("meta", "config", "notes", "ceilings", "gather", "decode", "concurrency", "clustering", "checks"):
        assert key in results, key
    assert results["errors"] == {}
    meta = results["meta"]
    for key in ("device", "torch", "triton", "date_utc", "command"):
        assert key in meta, key
    assert "--quick" in meta["command"]

    ceilings = results["ceilings"]
    assert positive((ceilings.get("h2d_pinned") or ceilings["host_copy"])["GBps"])

    gather = results["gather"]
    assert gather["backends"], "no gather backend ran"
    for backend, report in gather["backends"].items():
        assert all(v == "ok" for v in gather["checks"][backend].values()), gather["checks"]
        assert all(positive(p["GBps"]) and positive(p["pct_of_copy_ceiling"]) for p in report["points"])

    decode = results["decode"]
    assert results["checks"]["plan_fetch"] == "ok"
    assert len(decode["configs"]) == 4
    for config in decode["configs"]:
        policies = config["policies"]
        assert set(POLICIES) <= set(policies), policies.keys()
        for name in ("full", "bound", "perstep-host-a", "perstep-host-b"):
            assert positive(policies[name]["step_ms"]), (name, policies[name])
            assert positive(policies[name]["gpu_kv_bytes"])
        louis = policies["louiskv"]
        assert louis["check"] == "ok" and policies["perstep-host-b"]["check"] == "ok"
        assert positive(louis["plain_step_ms"]) and positive(louis["boundary_step_ms"])
        assert set(louis["avg_step_ms"]) == {f"{r:g}" for r in decode["rates"]}
        assert louis["gpu_kv_bytes"] < policies["full"]["gpu_kv_bytes"]
        ratios = config["ratios"][f"r={decode['measured_rate']:g}"]
        assert positive(ratios["louiskv_over_bound"]) and positive(ratios["louiskv_speedup_vs_full"])

    concurrency = results["concurrency"]
    assert positive(concurrency["full"]["tokens_per_s"])
    assert positive(concurrency["louiskv"]["host_limited"]["tokens_per_s"])
    assert positive(concurrency["louiskv"]["host_limited"]["speedup_vs_full"])

    clustering = results["clustering"]
    assert positive(clustering["prefill"]["median_ms"])
    assert positive(clustering["kmeans"]["torch"]["median_ms"]) and clustering["kmeans"]["torch"]["check"] == "ok"
    assert positive(clustering["best_share_of_prefill"])

    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(results["plot"]).is_file()


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter(tmp_path: Path) -> None:
    """The Triton gather and residency-plan kernels inside the decode policies, checked against
    the host rows, with TRITON_INTERPRET=1 (what a CPU can check of the GPU path)."""
    results = run_bench(tmp_path, "--parts", "gather,decode", "--contexts", "256", "--batches", "2",
                        "--gather-backend", "triton", env={"TRITON_INTERPRET": "1"})
    assert results["errors"] == {}
    assert all(v == "ok" for v in results["gather"]["checks"]["triton"].values())
    assert results["decode"]["gather"]["default_backend"] == "triton"
    assert results["decode"]["plan_backend"] == "triton"
    assert results["checks"]["plan_fetch"] == "ok"
    policies = results["decode"]["configs"][0]["policies"]
    assert policies["louiskv"]["check"] == "ok"
    assert policies["perstep-host-b"]["check"] == "ok"


def test_bench_e2e_runs_on_cpu(tmp_path):
    """`kvrecall bench e2e` end to end on tiny shapes: a real daemon, every part, the JSON keys
    the README renderer reads (no timing is asserted)."""
    from kvrecall.cli import main

    out = tmp_path / "e2e.json"
    argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--contexts", "200", "--batches", "2",
            "--policies", "louiskv", "--budget", "64", "--rates", "0,0.117,1", "--lag", "1", "--steps", "3", "--warmup", "1",
            "--repeats", "2",
            "--profile-steps", "2", "--many", "4",
            "--many-context", "100", "--capped-context", "200", "--gpu-kv-cap-gib", "0.0005",
            "--host-cap-gib", "0.002", "--out", str(out)]  # fmt: skip
    frozen_before = gc.get_freeze_count()
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert not result["errors"]
    parts = {(r["part"], r["policy"]) for r in result["rows"]}
    assert parts == {("step", "full"), ("step", "louiskv"), ("capped", "full"), ("capped", "louiskv"),
                     ("many", "louiskv")}  # fmt: skip
    louiskv = [r for r in result["rows"] if r["part"] == "step" and r["policy"] == "louiskv"]
    assert [r["rate"] for r in louiskv] == [0.0, 0.117, 1.0]
    # at lag 1 a slot may cross on every step (at lag L it reads its shadow for L steps)
    assert louiskv[0]["boundary_share"] == 0.0 and louiskv[2]["boundary_share"] == 1.0
    # two blocks of 3 steps each, one after another: each block's mean and their spread
    for row in louiskv:
        blocks = row["mean_ms_blocks"]
        # (both rounded to 3 decimals: the spread lies within what the rounded means allow)
        low, high = max(blocks) - 5e-4, max(blocks) + 5e-4
        assert len(blocks) == 2
        assert low / (min(blocks) + 5e-4) - 5e-4 <= row["block_spread"] <= high / (min(blocks) - 5e-4) + 5e-4
        assert min(blocks) - 1e-3 <= row["mean_ms"] <= max(blocks) + 1e-3
        # the collector's passes in the timed steps (setup's objects frozen first: meta.gc_freeze)
        assert len(row["gc_collections"]) == 3 and all(n >= 0 for n in row["gc_collections"])
        assert row["gc_pause_ms_max"] >= 0 and row["gc_full_ms_total"] >= 0
    assert result["meta"]["gc_freeze"] is True and gc.get_freeze_count() == frozen_before  # unfrozen after each
    assert {"speedup_vs_full_0K_b2_lag1", "over_bound_0K_b2_lag1"} <= set(result["meta"]["ratios"])
    # whether the steps waited on the daemon: per step waits, per retrieving call latencies
    many = {r["rate"]: r for r in result["rows"] if r["part"] == "many"}
    assert many[0.0]["answers"] == 0 and many[0.0]["answer_ms_median"] is None
    every = louiskv[2]
    assert every["answers"] == 6 and 0 < every["answer_ms_median"] <= every["answer_ms_p90"] <= every["answer_ms_max"]
    assert 0 <= every["late_ms_mean"] <= every["wait_ms_mean"] and every["late_steps"] <= 6
    # where the host time went, the bytes each retrieval moved, and a profile of the steps
    assert every["moved_mib_mean"] > 0 and "moved_mib_mean" not in louiskv[0]
    assert 0 < every["moved_share"] <= 1 and every["query_drift"] == 1.0
    # switch "fixed" (the default): every crossed slot read its shadow for exactly --lag steps
    assert every["switch"] == "fixed" and every["shadow_steps_mean"] == 1.0 and result["meta"]["switch"] == "fixed"
    assert 0 <= every["shadow_ms_mean"] + every["send_ms_mean"] <= every["host_ms_mean"] + 1e-3
    assert every["host_profile"] and all(f["calls_per_step"] > 0 for f in every["host_profile"])
    assert "host_profile" not in louiskv[0]
    assert {"many_wait_ms_mean_at_measured_rate", "many_late_steps_at_measured_rate"} <= set(result["meta"]["ratios"])
    assert (tmp_path / "e2e.png").exists()
    # the host's speed before and after the runs (a slow episode shows beside the figures)
    probe = result["meta"]["host_probe"]
    assert all(probe[when][key] > 0 for when in ("start", "end") for key in ("gather_ms", "python_ms"))


def test_bench_e2e_query_drift_makes_retrievals_move_less(tmp_path):
    """--query-drift (an emulation knob): a forced crossing retrieves for a query only part of the
    way from the slot's last retrieval query to this step's, so consecutive selections overlap and
    each retrieval moves a smaller share of its budget than with a fresh query (drift 1)."""
    from kvrecall.cli import main

    shares = {}
    for drift in ("1", "0.1"):
        out = tmp_path / f"drift-{drift}.json"
        argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--contexts", "1000", "--batches", "2",
                "--policies", "louiskv", "--budget", "64", "--rates", "0.25", "--lag", "1", "--steps", "48",
                "--warmup", "4", "--parts", "step", "--query-drift", drift, "--out", str(out)]  # fmt: skip
        assert main(argv) == 0
        (row,) = [r for r in json.loads(out.read_text())["rows"] if r["policy"] == "louiskv"]
        assert row["query_drift"] == float(drift)
        shares[drift] = row["moved_share"]
    assert 0 < shares["0.1"] < 0.75 * shares["1"], shares


def test_bench_e2e_shared_prompt_holds_one_document_for_the_batch(tmp_path):
    """--shared-prompt: the batch's sessions open over the first one's prompt (a held prefix), so
    the daemon's host tier holds the document once: less than the same batch each ingesting it."""
    from kvrecall.cli import main

    used = {}
    for shared in (False, True):
        out = tmp_path / f"e2e-{shared}.json"
        argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--parts", "step", "--contexts", "6000",
                "--batches", "3", "--policies", "louiskv", "--budget", "64", "--rates", "0.117", "--lag", "1",
                "--steps", "3", "--warmup", "1", "--out", str(out)] + (["--shared-prompt"] if shared else [])  # fmt: skip
        assert main(argv) == 0
        result = json.loads(out.read_text())
        assert not result["errors"]
        rows = [r for r in result["rows"] if r["policy"] == "louiskv"]
        assert rows and all(r["shared_prompt"] is shared for r in rows)
        used[shared] = rows[0]["host_gib"]
    assert used[True] < 0.6 * used[False], used


def test_bench_e2e_refuses_a_query_drift_outside_0_1(capsys):
    from kvrecall.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--device", "cpu", "--query-drift", "0"])
    assert "--query-drift" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expected"), [
    ([], True), (["--lag", "0"], False), (["--lag", "0,4"], False), (["--notices", "waited"], False),
    (["--host-copies", "kernel"], False), (["--overlap", "off"], False), (["--overlap", "on", "--lag", "2"], True),
])  # fmt: skip
def test_bench_e2e_overlap_auto_is_on_where_the_engine_can_run_it(extra, expected):
    from kvrecall.bench.e2e import _overlap, parse_args

    assert _overlap(parse_args(["--device", "cpu", *extra])) is expected


def test_bench_e2e_runs_with_an_embedded_daemon(tmp_path):
    """`bench e2e --daemon embedded`: the daemon on a thread of the bench's process (its
    KVRECALL_* settings from --daemon-env), the rows as with a daemon process, the mode in meta."""
    from kvrecall.cli import main

    out, log = tmp_path / "e2e.json", tmp_path / "daemon.log"
    argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--contexts", "300", "--batches", "2",
            "--policies", "louiskv", "--budget", "64", "--rates", "0,0.25", "--lag", "1", "--steps", "6",
            "--warmup", "1", "--parts", "step", "--daemon", "embedded", "--daemon-env", "KVRECALL_WORKER_COPY_SHARE=1",
            "--daemon-log", str(log), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert not result["errors"] and result["meta"]["daemon"] == "embedded"
    louiskv = {r["rate"]: r for r in result["rows"] if r["policy"] == "louiskv"}
    assert louiskv[0.25]["boundary_share"] > 0 and louiskv[0.25]["answers"] > 0
    # the daemon's threads share the interpreter lock: the embedded default switch interval
    assert result["meta"]["switch_interval_ms"] == 0.2 and louiskv[0.25]["switch_interval_ms"] == 0.2
    text = log.read_text()
    assert "embedded daemon config" in text and '"worker_copy_share": 1.0' in text, text[-2000:]
    assert text.rstrip().endswith("stopped")


def test_bench_e2e_worker_selection_emulation_selects_once_per_crossing(tmp_path):
    """--worker-selection (an emulation, kvrecall/bench/worker_selection.py): the engine hands each
    step's crossed slots' retrieval queries to the worker's own selection, once per crossing, and
    only at crossings (none at rate 0); the daemon's retrievals dry. Rows say so."""
    from kvrecall.cli import main

    out = tmp_path / "e2e.json"
    argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--contexts", "600", "--batches", "2",
            "--policies", "louiskv", "--budget", "64", "--rates", "0,0.25", "--lag", "1", "--steps", "16",
            "--warmup", "2", "--parts", "step", "--worker-selection", "--daemon-env", "KVRECALL_DRY_RETRIEVALS=1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert not result["errors"]
    rows = {r["rate"]: r for r in result["rows"] if r["policy"] == "louiskv"}
    assert all(r["worker_selection"] for r in rows.values())
    assert rows[0.0]["worker_selections"] == 0
    timed = round(rows[0.25]["boundary_share"] * 16 * 2)  # crossings in the timed steps (warm-up ones besides)
    assert timed > 0 and rows[0.25]["worker_selections"] >= timed
    assert all("worker_selection" not in r for r in result["rows"] if r["policy"] == "full")


def test_bench_e2e_with_worker_selection_the_worker_chooses_every_crossing(tmp_path):
    """The real path (not the emulation): a daemon with worker_selection maps each louiskv
    session's unit table and the engine chooses every crossing's retrieval itself; rows count it."""
    from kvrecall.cli import main

    out = tmp_path / "e2e.json"
    argv = ["bench", "e2e", "--device", "cpu", "--shape", "tiny", "--contexts", "600", "--batches", "2",
            "--policies", "louiskv", "--budget", "64", "--rates", "0,0.25", "--lag", "1", "--steps", "16",
            "--warmup", "2", "--parts", "step",
            "--daemon-env", "KVRECALL_WORKER_COPY_SHARE=1", "--daemon-env", "KVRECALL_WORKER_SELECTION=1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert not result["errors"]
    rows = {r["rate"]: r for r in result["rows"] if r["policy"] == "louiskv"}
    assert "worker_choices" not in rows[0.0]
    timed = round(rows[0.25]["boundary_share"] * 16 * 2)
    assert timed > 0 and rows[0.25]["worker_choices"] == timed


def test_worker_selection_runs_louiskv_selection_per_query():
    import torch

    from kvrecall.bench.worker_selection import WorkerSelection

    emulation = WorkerSelection(torch.device("cpu"), context=800, budget=64, rows=4, groups=2, head_dim=16)
    assert emulation.reps.shape == (4, 50, 16) and emulation.pinned.shape == (4, 32)
    emulation([torch.randn(2, 4, 16), torch.randn(2, 4, 16)])  # [L, Hq, D] queries of two crossed slots
    assert emulation.selections == 2
    emulation([])
    assert emulation.selections == 2


def test_worker_selection_pins_distinct_ascending_tokens():
    import torch

    from kvrecall.bench.worker_selection import WorkerSelection

    emulation = WorkerSelection(torch.device("cpu"), context=4096, budget=1024, rows=3, groups=1, head_dim=8)
    pinned = emulation.pinned
    assert pinned.shape == (3, 256) and bool((pinned.diff(dim=1) > 0).all()) and int(pinned.max()) < 4096
