"""LocalDaemon: start a real `kvrecall serve` process on a private unix socket.

Used by `kvrecall demo` / `eval` when no --target is given, and by the integration tests,
which always talk real gRPC to a real daemon process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class LocalDaemon:
    """A daemon on a private socket, for one caller (a tool, a benchmark, a test): its pools
    are sized for that caller, so the per-worker fair share is off (`worker_share=1`) unless
    asked for (`worker_share=None`: the daemon's default, or a fraction). Its socket and log
    live in a private temporary directory, removed when it stops cleanly; after a failure it
    stays, and `stop` returns the exit code (the log's path is `log_path`). It stops by itself
    once the process that started it is gone (`serve --parent-pid`)."""

    def __init__(
        self,
        host_pool_gb: float = 2.0,
        device_pool_gb: float = 1.0,
        device: str = "cpu",
        extra_args: list[str] | None = None,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        worker_share: float | None = 1.0,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvrecall-")
        self.socket = os.path.join(self._dir, "kvrecall.sock")
        self.target = f"unix://{self.socket}"
        self.log_path = log_path or os.path.join(self._dir, "daemon.log")
        self.args = [
            sys.executable, "-m", "kvrecall.cli", "serve", "--listen", self.target, "--device", device,
            "--host-pool-gb", str(host_pool_gb), "--device-pool-gb", str(device_pool_gb), *(extra_args or []),
        ]
        if worker_share is not None:
            self.args += ["--worker-share", str(worker_share)]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> LocalDaemon:
        """Start the process and wait until it serves (a CUDA daemon compiles its kernels first);
        again after a stop (a restart: the same socket)."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)  # a clean stop removed it
        self._log = open(self.log_path, "ab")
        # It stops once the process starting it is gone (killed by a time limit, say), not holding its pools.
        args = [*self.args, "--parent-pid", str(os.getpid())]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        from kvrecall.client import KVRecallClient, KVRecallClientError

        client = KVRecallClient(self.target, "local-probe", connect_retries=0, timeout=2.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.process.returncode}: {self.log()[-2000:]}")
                if Path(self.socket).exists():
                    try:
                        if client.health(timeout=2.0) == "SERVING":
                            return self
                    except KVRecallClientError:
                        pass
                time.sleep(0.1)
        finally:
            client.close()
        self.stop()
        raise TimeoutError(f"daemon not serving after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self.process.returncode in (0, -signal.SIGTERM) and Path(self.log_path).parent == Path(self._dir):
            shutil.rmtree(self._dir, ignore_errors=True)  # every run left a directory in /tmp before
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LocalDaemon:
        if self.process is not None and self.process.poll() is None:
            return self  # already started (e.g. `with daemon.start(timeout=...)`)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
