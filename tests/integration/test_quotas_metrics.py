"""Per-worker quotas, per-worker stats and the Prometheus endpoint of a real daemon."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from kvrecall.client import KVRecallClient, ResourceExhaustedError
from kvrecall.local import LocalDaemon
from tests.conftest import SMALL, random_kv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def quota_daemon():
    port = free_port()
    # One SMALL session holds one 1 MiB host page plus a ~0.3 MiB working set: 3 MiB fits two.
    with LocalDaemon(
        host_pool_gb=0.25, device_pool_gb=0.1,
        extra_args=["--worker-quota-gb", str(3 / 1024), "--metrics-port", str(port), "--page-kb", "1024"],
    ) as daemon:
        yield daemon, port


def test_quota_refuses_one_worker_and_spares_the_others(quota_daemon):
    daemon, _ = quota_daemon
    with KVRecallClient(daemon.target, "greedy") as greedy, KVRecallClient(daemon.target, "modest") as modest:
        held = [greedy.open_session(SMALL, "full"), greedy.open_session(SMALL, "full")]
        with pytest.raises(ResourceExhaustedError) as info:
            greedy.open_session(SMALL, "full")
        assert "quota" in info.value.details and "greedy" in info.value.details
        with modest.open_session(SMALL, "full") as other:
            other.ingest(random_kv(SMALL, 64, seed=3))
            with KVRecallClient(daemon.target, "") as operator:  # no worker id: sees every tenant
                workers = {w.worker_id: w for w in operator.stats().workers}
            assert workers["greedy"].sessions == 2 and workers["modest"].sessions == 1
        for session in held:
            session.close()


def test_metrics_endpoint_serves_kvrecall_series(quota_daemon):
    daemon, port = quota_daemon
    with KVRecallClient(daemon.target, "metrics-worker") as client:
        with client.open_session(SMALL, "louiskv", {"budget": 32, "window": 32}) as session:
            session.ingest(random_kv(SMALL, 200, seed=5))
            session.boundary()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for series in (
        "kvrecall_sessions", "kvrecall_pool_used_bytes", "kvrecall_pool_free_bytes", "kvrecall_boundaries_total",
        "kvrecall_bytes_moved_total", "kvrecall_rpc_seconds_bucket", "kvrecall_sessions_opened_total",
    ):
        assert series in body, series
    assert 'kvrecall_boundaries_total{policy="louiskv"} 1.0' in body
