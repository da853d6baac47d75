"""EmbeddedDaemon: the daemon in its worker's own process, on a thread of its own.

Two processes on one GPU time-slice: a worker's decode step waits out every burst of the
daemon's retrieval kernels and the context switches around them (on an H200 at 32K x 8, 0.21 ms
of the daemon's GPU time a retrieval cost the worker's captured step ~0.6 ms). In one process the
daemon's kernels are launched on its own streams in the worker's CUDA context, where they run
beside the step's instead of in turns with them.

What the daemon is stays the same: gRPC on a private unix socket (the worker's client talks to
it as to any daemon), its config from the KVRECALL_* environment and the arguments here, its
pools, its sessions. Tensors it hands over as CUDA IPC handles are this process's own memory
(kvrecall.cuda_ipc maps them to themselves). What is given up: isolation (a worker that crashes
takes its daemon with it, and the daemon's Python shares the worker's interpreter lock), and
sharing (other workers may connect to the socket, but its pools are sized for this one). For a
single worker on a GPU; a shared daemon stays a process of its own (`kvrecall serve`).

The same interface as LocalDaemon (`target`, `start`, `stop`, a context manager, `log`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvrecall.server.config import load_config

log = logging.getLogger("kvrecall.embedded")


class EmbeddedDaemon:
    """A daemon serving from a thread of this process on a private socket (module docstring).
    `env`: KVRECALL_* settings over this process's environment; `overrides`: settings by name;
    pools of None: the config's (KVRECALL_HOST_POOL_GB, KVRECALL_DEVICE_POOL_GB, else the defaults)."""

    def __init__(
        self,
        host_pool_gb: float | None = None,
        device_pool_gb: float | None = None,
        device: str = "cpu",
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        worker_share: float | None = 1.0,
        overrides: dict | None = None,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvrecall-embedded-")
        self.socket = os.path.join(self._dir, "kvrecall.sock")
        self.target = f"unix://{self.socket}"
        self.log_path = log_path or os.path.join(self._dir, "daemon.log")
        # gc_freeze off: the process is its owner's, who freezes once ready (worker --serve, the bench)
        settings = {"listen": [self.target], "device": device, "host_pool_gb": host_pool_gb,
                    "device_pool_gb": device_pool_gb, "worker_share": worker_share, "gc_freeze": False,
                    **(overrides or {})}  # fmt: skip
        self.config = load_config(overrides=settings, env={**os.environ, **(env or {})})
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._daemon = None
        self._error: BaseException | None = None
        self._handler: logging.Handler | None = None
        self._own_handles = False
        self._level = logging.NOTSET

    def start(self, timeout: float = 300.0) -> EmbeddedDaemon:
        """Start the thread and wait until the daemon serves (a CUDA daemon compiles its
        kernels first); an error while starting is raised here."""
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("kvrecall")
        root.addHandler(self._handler)
        self._level = root.level  # (given back at stop)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        log.info("embedded daemon config: %s", json.dumps(self.config.summary(), default=str))
        if self.config.device.startswith("cuda"):
            from kvrecall import cuda_ipc

            cuda_ipc.serve_own_handles(True)
            self._own_handles = True
        ready = threading.Event()
        self._error = None
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name="kvrecall-daemon", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"embedded daemon not serving after {timeout}s: {self.log()[-2000:]}")
        if self._error is not None:
            self.stop()
            raise RuntimeError(f"embedded daemon failed to start: {self._error!r}") from self._error
        return self

    def _serve(self, ready: threading.Event) -> None:
        from kvrecall.server.daemon import Daemon

        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            if self.config.device.startswith("cuda"):
                self._own_streams(loop)
            self._daemon = Daemon(self.config)
            loop.run_until_complete(self._daemon.start())
            ready.set()
            loop.run_until_complete(self._daemon.serve_until_stopped(signals=False))  # (the worker's signals)
        except BaseException as exc:  # reported by start(), or logged after it
            self._error = exc
            log.exception("embedded daemon stopped on an error")
        finally:
            ready.set()
            loop.close()

    def _own_streams(self, loop: asyncio.AbstractEventLoop) -> None:
        """The daemon's threads (this loop's and its executor's) work on a stream of their own, of
        the highest priority, as does its notice stream: not on the default stream, which here is
        the worker's too (a daemon's kernels queued behind whole decode steps answered ~2x late
        on an H200), and ahead of the step's blocks where both wait for the GPU."""
        import torch

        from kvrecall.server import streams

        device = torch.device(self.config.device if ":" in self.config.device else "cuda:0")
        streams.set_priority(streams.HIGHEST)
        stream = streams.daemon_stream(device)
        torch.cuda.set_stream(stream)
        loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="kvrecall-daemon",
                                                     initializer=torch.cuda.set_stream, initargs=(stream,)))  # fmt: skip

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop serving (sessions released, pools freed); 0 after a clean stop, 1 after an error."""
        if self._thread is None:
            return None
        if self._loop is not None and self._daemon is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._daemon.request_stop)
            except RuntimeError:  # the loop closed meanwhile
                pass
        deadline = time.monotonic() + timeout
        self._thread.join(max(0.0, deadline - time.monotonic()))
        stuck = self._thread.is_alive()
        self._thread = None
        if self._own_handles:
            from kvrecall import cuda_ipc

            cuda_ipc.serve_own_handles(False)
            self._own_handles = False
        if self._handler is not None:
            root = logging.getLogger("kvrecall")
            root.removeHandler(self._handler)
            root.setLevel(self._level)
            self._handler.close()
            self._handler = None
        code = 1 if (self._error is not None or stuck) else 0
        if code == 0 and Path(self.log_path).parent == Path(self._dir):
            shutil.rmtree(self._dir, ignore_errors=True)
        return code

    def __enter__(self) -> EmbeddedDaemon:
        if self._thread is not None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
