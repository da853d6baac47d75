"""A flood of bad requests cannot flood the daemon's log.

Undecodable Decode-stream messages and bad unary calls are answered (INVALID_ARGUMENT /
NOT_FOUND) and logged rate-limited: at most `burst` lines per kind a minute plus one line
saying how many were dropped, never a traceback."""

from __future__ import annotations

import os

import grpc
import pytest

from kvrecall.local import LocalDaemon
from kvrecall.server.ratelog import BURST
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import Raw

C = grpc.StatusCode
FLOOD = 300


@pytest.fixture
def fresh():
    """A daemon of its own: the rate limiter's window starts with this test (the shared
    daemon's may be spent by the other tests' bad requests within the same minute)."""
    with LocalDaemon(host_pool_gb=0.125, device_pool_gb=0.0625, extra_args=["--page-kb", "256"]) as daemon:
        raw = Raw(daemon.target)
        yield daemon, raw
        raw.close()


def test_bad_request_flood_leaves_a_bounded_log(fresh):
    rdaemon, raw = fresh
    before = os.path.getsize(rdaemon.log_path)
    for _ in range(FLOOD):
        _, answer = raw.stream([b"\x0a\x05ab"])
        assert answer.code == C.INVALID_ARGUMENT and answer.details.startswith("request:"), answer.details
        answer = raw.call("KeepAlive", pb.KeepAliveRequest(session_id="s-0000000000000000", capability="x"))
        assert answer.code == C.NOT_FOUND
    with open(rdaemon.log_path, errors="replace") as f:
        f.seek(before)
        grown = f.read()
    assert "Traceback" not in grown, grown[-3000:]
    warnings = [line for line in grown.splitlines() if "WARNING" in line and "Decode stream of" in line]
    # a window may roll over during the flood: two windows' worth at most
    assert 1 <= len(warnings) <= 2 * BURST, warnings
    lines = grown.splitlines()
    assert len(lines) <= 3 * 2 * (BURST + 1), lines[-40:]  # three kinds of line, two windows, the dropped counts
    assert raw.health() == "SERVING"
    print(f"{2 * FLOOD} rejected requests grew the log by {len(grown)} bytes in {len(lines)} lines")
