"""Daemon restart: clients see UnavailableError with a clear message while it is down, the
same KVRecallClient reconnects (with backoff) once it is back, new sessions work and the
old session ids answer NOT_FOUND (in-flight sessions are lost: docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvrecall.client import KVRecallClient, NotFoundError, UnavailableError
from kvrecall.local import LocalDaemon
from kvrecall.shm import ShmSegment
from tests.reliability.conftest import SPEC, random_kv

LONG = SPEC.__class__(**{**SPEC.__dict__, "max_tokens": 50_000})  # decodes for a while without hitting the end
LOUISKV = {"budget": 32, "n_sink": 4, "window": 32, "cluster_size": 8}


@pytest.fixture
def restartable():
    daemon = LocalDaemon(host_pool_gb=0.0625, device_pool_gb=0.0625)
    yield daemon
    daemon.stop()


def decode(session, kv: torch.Tensor, start: int, steps: int) -> None:
    for position in range(start, start + steps):
        session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
        session.advance()


def test_restart_unavailable_then_reconnect(restartable):
    daemon = restartable.start()
    client = KVRecallClient(daemon.target, "restart-worker", timeout=10.0, connect_retries=3)
    kv = random_kv(SPEC, 300, seed=2)
    old = client.open_session(LONG, "louiskv", LOUISKV, lease_seconds=5)
    old.ingest(kv[:, :, :, :200].contiguous(), torch.randn(2, 4, max(1, old.observation), 16))
    decode(old, kv, 200, 20)

    # a decode loop is running when the daemon is stopped: it ends with UnavailableError
    errors: list[BaseException] = []
    running = threading.Event()

    def decode_forever() -> None:
        position = 220
        try:
            while True:
                old.write_token(position, kv[:, 0, :, position % 300], kv[:, 1, :, position % 300])
                old.advance()
                position += 1
                if position % 5 == 0:
                    old.boundary()
                running.set()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=decode_forever, daemon=True)
    worker.start()
    assert running.wait(30)
    assert daemon.stop() == 0  # SIGTERM: a clean shutdown
    worker.join(30)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], UnavailableError), errors
    assert daemon.target in str(errors[0]) and "restart" in str(errors[0])

    # while it is down: every call fails fast with a clear UnavailableError
    started = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        client.stats()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert info.value.code.name == "UNAVAILABLE"
    assert daemon.target in message and "unavailable" in message and "4 attempt(s)" in message, message
    assert 0.5 < elapsed < 10, f"retries with backoff took {elapsed:.1f}s"
    with pytest.raises(UnavailableError):
        client.open_session(SPEC, "full")
    with pytest.raises(UnavailableError):
        old.append()

    # back on the same socket: the same client object reconnects
    daemon.start()
    assert client.health() == "SERVING"
    pools = {p.tier: p.used_bytes for p in client.stats().pools}
    assert pools == {"host": 0, "device": 0}
    with client.open_session(SPEC, "louiskv", LOUISKV) as new:
        new.ingest(kv[:, :, :, :200].contiguous(), torch.randn(2, 4, max(1, new.observation), 16))
        decode(new, kv, 200, 40)
        new.query.copy_(torch.randn(2, 4, 16))
        new.boundary()
        assert new.stats().tokens == 200 + 32
    # the old session is gone: NOT_FOUND for its id, and closing it is a quiet no-op
    with pytest.raises(NotFoundError):
        client.stats(old.session_id)
    with pytest.raises(NotFoundError):
        old.append()
    assert old.close() is None
    assert {p.tier: p.used_bytes for p in client.stats().pools} == {"host": 0, "device": 0}
    client.close()


def test_client_created_while_daemon_is_down_connects_later(restartable):
    daemon = restartable  # not started yet
    client = KVRecallClient(daemon.target, "early-worker", timeout=5.0, connect_retries=1)
    with pytest.raises(UnavailableError):
        client.stats()
    daemon.start()
    with client.open_session(SPEC, "streaming", {"n_sink": 4, "window": 32}) as session:
        session.ingest(random_kv(SPEC, 50, seed=3))
    client.close()


def test_restart_cleans_up_shared_memory(restartable):
    """A SIGKILLed daemon leaves nothing in /dev/shm (its pools and working sets are memfds,
    gone with the process and its workers' mappings); named segments left by dead processes
    (a dead worker's ingest staging) are removed by the next start."""
    daemon = restartable.start()
    client = KVRecallClient(daemon.target, "kill-worker", timeout=10.0, connect_retries=2)
    session = client.open_session(SPEC, "full")
    pid = daemon.process.pid
    prefix = f"kvrecall-{pid}-"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    stale = ShmSegment.create(f"{prefix}stage-left-behind", 4096)  # named after the dying pid
    daemon.kill()
    daemon.stop()
    daemon.start()
    assert not os.path.exists(os.path.join("/dev/shm", stale.name))
    stale.owner = False  # already unlinked by the daemon
    stale.release()
    with pytest.raises(NotFoundError):
        client.stats(session.session_id, session.capability)
    session.close()
    client.close()
