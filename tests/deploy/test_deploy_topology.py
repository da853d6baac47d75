"""The compose topology without Docker: one daemon and two workers started from the commands
that compose.yaml gives the `cpu` profile's services, the way Compose would start them (the
workers once the daemon's health check passes), on this machine.

Only the socket's directory moves (to a temporary one), the pools shrink and the workers run
one short session each, so it fits a CI machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from deploy_helpers import SOCKET_ADDRESS, command_list, environment, load_compose

pytestmark = [pytest.mark.slow, pytest.mark.model, pytest.mark.timeout(900)]

DAEMON, WORKERS = "kvrecall-cpu", ("worker-a-cpu", "worker-b-cpu")
OVERRIDES = {
    "--host-pool-gb": "1",
    "--device-pool-gb": "1",
    "--sessions": "1",
    "--context-tokens": "256",
}


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


def _argv(service: dict, address: str, metrics_port: int) -> list[str]:
    argv = [a.replace(SOCKET_ADDRESS, address) for a in command_list(service)]
    for i, arg in enumerate(argv[:-1]):
        if arg in OVERRIDES:
            argv[i + 1] = OVERRIDES[arg]
        elif arg == "--metrics-port":
            argv[i + 1] = str(metrics_port)
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


def test_one_daemon_and_two_workers_as_compose_starts_them(tmp_path):
    services = load_compose()["services"]
    address = f"unix://{tmp_path}/kvrecall.sock"
    metrics_port = _free_port()
    logs = {}

    def start(name: str) -> subprocess.Popen:
        logs[name] = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        argv = _argv(services[name], address, metrics_port)
        return subprocess.Popen(
            [*_kvrecall(), *argv],
            env=_env(services[name]),
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(name: str) -> str:
        logs[name].flush()
        return (tmp_path / f"{name}.log").read_text()[-4000:]

    daemon = start(DAEMON)
    workers: dict[str, subprocess.Popen] = {}
    try:
        # depends_on: condition: service_healthy
        deadline = time.monotonic() + 120
        while not _healthy(address, _env(services[DAEMON])):
            assert daemon.poll() is None, f"daemon exited {daemon.returncode}:\n{tail(DAEMON)}"
            assert time.monotonic() < deadline, f"daemon not healthy in 120 s:\n{tail(DAEMON)}"
            time.sleep(0.5)

        workers = {name: start(name) for name in WORKERS}  # concurrently, as compose does
        for name, proc in workers.items():
            code = proc.wait(timeout=780)
            assert code == 0, f"{name} exited {code}:\n{tail(name)}"

        # What Prometheus scrapes.
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "kvrecall_" in body

        # docker compose stop: SIGTERM, then SIGKILL after stop_grace_period (30 s).
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, f"daemon did not stop cleanly:\n{tail(DAEMON)}"
    finally:
        for proc in (daemon, *workers.values()):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for f in logs.values():
            f.close()
