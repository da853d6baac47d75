"""Working sets reach their worker from the daemon that opened the session, however many
`kvrecall serve` processes are pointed at the same socket.

The bug this guards against: a second daemon started on a running daemon's socket paths
(e.g. a LocalDaemon started twice) replaced the fd socket file once it had booted. A worker's
gRPC channel stays connected to the first daemon, which opens its sessions, but every fd
request is a fresh connection to the path: it reached the second daemon, which knows no
session, and `open_session` failed with FdPassError NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.fdpass import FdServer
from kvrecall.local import LocalDaemon
from tests.reliability.conftest import SPEC

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8}
BOOT_WAIT = 180.0  # how long to wait for the second daemon to serve or quit (a loaded CI box)


def open_and_close(client: KVRecallClient, tag: str) -> str:
    """Open a shm session (its working set arrives by fd), touch the mapping, close it."""
    session = client.open_session(SPEC, "louiskv", CONFIG, tag=tag)
    try:
        session.keys.zero_()  # the mapping is real
        return session.session_id
    finally:
        session.close()


def test_second_daemon_on_the_same_socket_does_not_take_over_the_fd_socket():
    with LocalDaemon(host_pool_gb=0.125, device_pool_gb=0.0625, extra_args=["--page-kb", "256"]) as first:
        fd_socket = first.socket + ".fds"
        with KVRecallClient(first.target, "fd-race", timeout=30.0) as client:
            open_and_close(client, "before")  # the channel is connected to the first daemon
            log_path = os.path.join(tempfile.mkdtemp(prefix="kvrecall-second-"), "daemon.log")
            with open(log_path, "wb") as log:
                second = subprocess.Popen(first.args, stdout=log, stderr=subprocess.STDOUT, env=first.env)
            try:
                deadline = time.monotonic() + BOOT_WAIT
                while (
                    second.poll() is None
                    and "serving on unix://" not in _read(log_path)
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.1)
                # The fd socket is still the first daemon's: sequential and concurrent opens all map.
                ids = [open_and_close(client, f"seq-{i}") for i in range(8)]
                with ThreadPoolExecutor(max_workers=4) as pool:
                    ids += list(pool.map(lambda i: open_and_close(client, f"par-{i}"), range(16)))
                assert len(set(ids)) == 24
                # ... because the second daemon refused to start, saying why.
                assert second.wait() != 0
                assert f"fd socket {fd_socket}: another daemon is serving on it" in _read(log_path)
            finally:
                if second.poll() is None:
                    second.kill()
                second.wait()
        assert first.process is not None and first.process.poll() is None  # the first one served throughout


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def test_fd_server_claims_only_a_stale_socket_and_removes_only_its_own():
    async def scenario(path: str) -> None:
        first = FdServer(path, 0o600, lambda session_id, capability: -1)
        await first.start()
        try:
            with pytest.raises(OSError, match="another daemon is serving on it"):
                await FdServer(path, 0o600, lambda session_id, capability: -1).start()
            assert os.path.exists(path)
        finally:
            await first.close()
        assert not os.path.exists(path)
        # A socket file left by a process that is gone (nobody listens): replaced.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        second = FdServer(path, 0o600, lambda session_id, capability: -1)
        await second.start()
        # Someone else's socket now at the path: the server's close() leaves it alone.
        os.unlink(path)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(path)
        await second.close()
        assert os.path.exists(path)
        other.close()
        os.unlink(path)

    asyncio.run(scenario(os.path.join(tempfile.mkdtemp(prefix="kvrecall-fdsock-"), "fds")))
