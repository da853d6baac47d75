"""The compose topology without Docker: one daemon and two serving worker replicas started
from the commands that compose.yaml gives the CPU stack's services, the way Compose would start
them (the workers once the daemon's health check passes), on this machine.

Only the socket's directory moves (to a temporary one), the pools shrink, and each replica gets
its own HTTP port and worker id (in containers: their own network namespace and host name), so
it fits a CI machine. scripts/test-deploy.sh runs the real thing in containers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from deploy_helpers import SOCKET_ADDRESS, command_list, environment, load_compose

pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(900)]

DAEMON, WORKER, REPLICAS = "kvrecall", "worker", 2
OVERRIDES = {"--host-pool-gb": "1", "--device-pool-gb": "1", "--budget": "64"}


def _kvrecall() -> list[str]:
    exe = shutil.which("kvrecall", path=os.path.dirname(sys.executable)) or shutil.which("kvrecall")
    return (
        [exe]
        if exe
        else [sys.executable, "-c", "import sys; from kvrecall.cli import main; sys.exit(main())"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(service: dict, address: str, port: int) -> list[str]:
    """The service's command on this machine, `port` for its --metrics-port or --port."""
    argv = [a.replace(SOCKET_ADDRESS, address) for a in command_list(service)]
    for i, arg in enumerate(argv[:-1]):
        if arg in OVERRIDES:
            argv[i + 1] = OVERRIDES[arg]
        elif arg in ("--metrics-port", "--port"):
            argv[i + 1] = str(port)
    return argv


def _env(service: dict) -> dict[str, str]:
    # The images' environment (Dockerfile ENV), then the service's own, as in the container.
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update(environment(service))
    return env


def _healthy(address: str, env: dict[str, str]) -> bool:
    out = subprocess.run(
        [*_kvrecall(), "health", "--target", address], env=env, capture_output=True, text=True, timeout=30
    )
    return out.returncode == 0 and "SERVING" in out.stdout


def _ready(port: int) -> bool:
    """The worker's readiness check (compose.yaml): GET /health answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _complete(port: int) -> dict:
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 2}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_one_daemon_and_two_serving_workers_as_compose_starts_them(tmp_path):
    services = load_compose()["services"]
    address = f"unix://{tmp_path}/kvrecall.sock"
    metrics_port = _free_port()
    logs = {}

    def start(name: str, service: str, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
        logs[name] = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        return subprocess.Popen(
            [*_kvrecall(), *_argv(services[service], address, port)],
            env={**_env(services[service]), **(env or {})},
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(name: str) -> str:
        logs[name].flush()
        return (tmp_path / f"{name}.log").read_text()[-4000:]

    daemon = start(DAEMON, DAEMON, metrics_port)
    workers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        # depends_on: condition: service_healthy
        deadline = time.monotonic() + 120
        while not _healthy(address, _env(services[DAEMON])):
            assert daemon.poll() is None, f"daemon exited {daemon.returncode}:\n{tail(DAEMON)}"
            assert time.monotonic() < deadline, f"daemon not healthy in 120 s:\n{tail(DAEMON)}"
            time.sleep(0.5)
        for replica in range(1, REPLICAS + 1):  # concurrently, as compose does
            name, port = f"{WORKER}-{replica}", _free_port()
            workers[name] = (start(name, WORKER, port, {"KVRECALL_WORKER_ID": name}), port)
        deadline = time.monotonic() + 600
        for name, (proc, port) in workers.items():
            while not _ready(port):
                assert proc.poll() is None, f"{name} exited {proc.returncode}:\n{tail(name)}"
                assert time.monotonic() < deadline, f"{name} not ready:\n{tail(name)}"
                time.sleep(1)
            answer = _complete(port)
            assert answer["choices"][0]["text"] and answer["kvrecall"]["worker"] == name, answer

        # What Prometheus scrapes.
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "kvrecall_" in body

        # docker compose stop: SIGTERM, then SIGKILL after stop_grace_period.
        for name, (proc, _) in workers.items():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0, f"{name} did not stop cleanly:\n{tail(name)}"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, f"daemon did not stop cleanly:\n{tail(DAEMON)}"
    finally:
        for proc in (daemon, *(p for p, _ in workers.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in logs.values():
            f.close()
