"""Leases: a session lives as long as its worker keeps calling; a dead worker's memory returns.

A real worker process (the SDK in a `python -c` subprocess) is SIGKILLed mid-decode; its
pool bytes must be back within the lease plus the reaper's interval. A session whose client
stops keeping it alive expires; one that keeps alive does not.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest

from kvrecall.client import KVRecallClient
from kvrecall.server.daemon import REAP_INTERVAL
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import SPEC, Raw, open_request, random_kv, wait_for

LEASE = 2
# The reaper runs every REAP_INTERVAL; on a loaded 2-core CI box give the rest some slack.
SLACK = 3.0

WORKER = textwrap.dedent(
    """
    import sys, time, torch
    from kvrecall.client import KVRecallClient, ModelSpec

    spec = ModelSpec(2, 2, 4, 16, torch.float32, 4096)
    client = KVRecallClient(sys.argv[1], "doomed-worker", timeout=30.0)
    session = client.open_session(spec, "louiskv", {"budget": 32, "n_sink": 4, "window": 32, "cluster_size": 8},
                                  lease_seconds=int(sys.argv[2]))
    session.ingest(torch.randn(2, 2, 2, 200, 16), torch.randn(2, 4, max(1, session.observation), 16))
    print("SESSION", session.session_id, session.capability, flush=True)
    position = 200
    while position < 4000:
        session.write_token(position, torch.randn(2, 2, 16), torch.randn(2, 2, 16))
        session.advance()
        position += 1
        if position % 10 == 0:
            session.query.copy_(torch.randn(2, 4, 16))
            session.boundary()
        if position == 240:
            print("DECODING", flush=True)
        time.sleep(0.005)
    print("FINISHED", flush=True)
    """
)


def _session_listed(raw: Raw, session_id: str) -> bool:
    stats = raw.ok("GetStats", pb.StatsRequest(), worker="")  # no worker id: the operator's view
    return any(s.session_id == session_id for s in stats.sessions)


def test_sigkilled_worker_memory_returns_within_the_lease(rdaemon, raw):
    baseline = raw.pools()
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, rdaemon.target, str(LEASE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines: list[str] = []

        def read() -> None:
            for line in worker.stdout:
                lines.append(line.strip())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert wait_for(lambda: "DECODING" in lines or worker.poll() is not None, 120), "worker never decoded"
        assert "DECODING" in lines, f"worker died: {worker.stderr.read()[-3000:]}"
        session_id, capability = next(line.split()[1:] for line in lines if line.startswith("SESSION"))
        stats = raw.ok("GetStats", pb.StatsRequest(session_id=session_id, capability=capability), worker="doomed-worker")
        assert stats.sessions[0].appends >= 1 and stats.sessions[0].boundaries >= 1  # really mid-decode
        held = raw.pools()
        assert held["host"] > baseline["host"] and held["device"] > baseline["device"]

        worker.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        worker.wait(10)
        assert "FINISHED" not in lines
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    bound = LEASE + REAP_INTERVAL + SLACK
    assert wait_for(lambda: raw.pools() == baseline, bound + 5), f"pools {raw.pools()} != baseline {baseline}"
    elapsed = time.monotonic() - killed
    assert elapsed <= bound, f"memory came back after {elapsed:.1f}s, lease {LEASE}s + reaper {REAP_INTERVAL}s"
    assert not _session_listed(raw, session_id)
    answer = raw.call("KeepAlive", pb.KeepAliveRequest(session_id=session_id, capability=capability), worker="doomed-worker")
    assert answer.code == grpc.StatusCode.NOT_FOUND
    assert "lease expired" in rdaemon.log() and session_id in rdaemon.log()
    assert raw.health() == "SERVING"


def test_silent_session_expires_and_kept_alive_ones_do_not(rdaemon, raw):
    baseline = raw.pools()
    kv = random_kv(SPEC, 64, seed=1)
    # silent: opened raw, nobody ever calls for it again
    silent = raw.ok("OpenSession", open_request(lease=LEASE)).session_id
    # manual: opened raw, kept alive by hand every half second
    manual = raw.ok("OpenSession", open_request(lease=LEASE)).session_id
    # sdk: the SDK's background keep-alive thread
    client = KVRecallClient(rdaemon.target, "rel-worker", timeout=30.0)
    sdk = client.open_session(SPEC, "streaming", {"n_sink": 4, "window": 32}, lease_seconds=LEASE)
    sdk.ingest(kv)
    opened = time.monotonic()
    try:
        while time.monotonic() - opened < 2 * LEASE + REAP_INTERVAL + 1:
            assert raw.ok("KeepAlive", pb.KeepAliveRequest(session_id=manual)).lease_seconds_left == LEASE
            time.sleep(0.5)
        assert not _session_listed(raw, silent), "a silent session outlived its lease"
        assert raw.call("GetStats", pb.StatsRequest(session_id=silent)).code == grpc.StatusCode.NOT_FOUND
        assert _session_listed(raw, manual)
        assert _session_listed(raw, sdk.session_id)
        # the kept-alive SDK session still decodes
        for position in range(64, 64 + sdk.spill_every):
            sdk.write_token(position, kv[:, 0, :, position % 64], kv[:, 1, :, position % 64])
            sdk.advance()
        assert sdk.stats().tokens == 64 + sdk.spill_every
    finally:
        sdk.close()
        client.close()
        raw.call("CloseSession", pb.CloseSessionRequest(session_id=manual))
    assert raw.pools() == baseline


@pytest.mark.parametrize("lease", [1, LEASE])
def test_granted_lease_is_the_requested_one(raw, lease):
    response = raw.ok("OpenSession", open_request(lease=lease))
    try:
        assert response.lease_seconds == lease
    finally:
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=response.session_id))

