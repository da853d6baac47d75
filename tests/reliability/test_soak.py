"""A short soak (the CI version of `kvrecall soak`): concurrent sessions of every kind decode,
reopen and close; the pools return to their baseline and the daemon's RSS stays bounded."""

from __future__ import annotations

import json
import subprocess
import sys

from kvrecall.soak import SoakConfig, format_table, run_soak

MiB = 1 << 20


def test_short_soak_returns_every_byte(rdaemon, raw):
    baseline = raw.pools()
    config = SoakConfig(sessions=4, steps=800, reopen_every=200, sample_seconds=0.2, target=rdaemon.target,
                        daemon_pid=rdaemon.process.pid)
    result = run_soak(config, log=lambda line: None)
    print(format_table(result))
    assert not result.errors, result.errors
    assert result.total_steps == 4 * 800
    assert result.opened == 4 * 4
    assert result.boundaries > 0 and result.appends > 0
    assert result.pool_baseline == baseline
    assert result.pool_end == baseline and result.pools_back and result.exit_code == 0
    assert result.pool_peak["host"] > baseline["host"] and result.pool_peak["device"] > baseline["device"]
    assert result.rss_start and result.rss_end
    assert result.rss_growth < 64 * MiB, f"daemon RSS grew {result.rss_growth / MiB:.1f} MiB after warm-up"
    assert raw.health() == "SERVING"


def test_soak_command_line(rdaemon):
    done = subprocess.run(
        [sys.executable, "-m", "kvrecall.cli", "soak", "--sessions", "2", "--steps", "100", "--reopen-every", "50",
         "--target", rdaemon.target, "--daemon-pid", str(rdaemon.process.pid), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["pools_back"] and report["exit_code"] == 0 and report["total_steps"] == 200
    assert report["rss_start"] > 0 and len(report["samples"]) >= 2
    assert "sessions x" in done.stderr and "back to baseline" in done.stderr
