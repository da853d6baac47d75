"""`kvrecall stats` against a real daemon: the operator's view of pools, sessions and workers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import SMALL, random_kv


def stats(target: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvrecall.cli", "stats", "--target", target, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_stats_shows_the_open_session_and_its_worker(daemon, client):
    with client.open_session(SMALL, "louiskv", {"budget": 16, "window": 32}, tag="ops-view") as session:
        session.ingest(random_kv(SMALL, 120, seed=2), None)
        done = stats(daemon.target, "--json")
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
        ours = [s for s in view["sessions"] if s["session_id"] == session.core.session_id]
        assert len(ours) == 1
        assert ours[0]["policy"] == "louiskv" and ours[0]["tag"] == "ops-view"
        assert int(ours[0]["prompt_tokens"]) == 120 and int(ours[0]["host_bytes"]) > 0
        assert {p["tier"] for p in view["pools"]} == {"host", "device"}
        assert any(w["worker_id"] == ours[0]["worker_id"] for w in view["workers"])
        table = stats(daemon.target, "--session", session.core.session_id)
        assert table.returncode == 0, table.stderr
        assert session.core.session_id in table.stdout and "louiskv" in table.stdout
        assert "sessions: 1" in table.stdout


def test_stats_names_the_problem_when_the_daemon_cannot_answer(daemon, tmp_path):
    gone = stats(f"unix://{tmp_path}/nobody.sock", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stdout
    unknown = stats(daemon.target, "--session", "no-such-session")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout and "no-such-session" in unknown.stdout
