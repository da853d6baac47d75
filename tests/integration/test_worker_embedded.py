"""`kvrecall worker --target embedded`: the worker starts its own daemon on a thread of its process
(kvrecall.server.embedded, settings from KVRECALL_* in its environment) and decodes the bundled
model through it; each session's line equals the one decoded through a daemon process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model

# boundaries at every step (threshold 0.999, no gap): the daemon retrieves while the worker decodes
ARGS = ["--sessions", "1", "--context-tokens", "400", "--max-new-tokens", "8", "--policy", "louiskv",
        "--budget", "64", "--policy-config", '{"min_gap": 0, "threshold": 0.999}', "--worker-id", "w",
        "--device", "cpu"]  # fmt: skip


def worker_lines(target: str, env: dict[str, str]) -> list[dict]:
    argv = [sys.executable, "-m", "kvrecall.cli", "worker", "--target", target, *ARGS]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_worker_with_an_embedded_daemon_decodes_as_with_a_daemon_process(daemon):
    small = {"KVRECALL_HOST_POOL_GB": "0.5", "KVRECALL_DEVICE_POOL_GB": "0.25"}
    embedded = worker_lines("embedded", small)
    process = worker_lines(daemon.target, {})
    assert len(embedded) == 1 and embedded[0]["generated_tokens"] > 0 and embedded[0]["retrievals"] > 0
    assert embedded == process


def test_worker_refuses_an_embedded_daemon_for_a_tensor_parallel_group():
    argv = [sys.executable, "-m", "kvrecall.cli", "worker", "--target", "embedded", *ARGS]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert done.returncode != 0 and "--target embedded" in done.stderr
