"""Coalesced retrievals (the daemon's default) on a CUDA daemon: each session's retrieval in a
Boundaries call of its own, all in flight at once and background (the copy engine's path), leave
the CUDA IPC working sets bitwise equal to twins retrieving one by one, and runs serve several."""

from __future__ import annotations

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP
from tests.integration.test_boundaries_coalesced import check_in_flight_equal_one_by_one
from tests.integration.test_quotas_metrics import free_port

pytestmark = pytest.mark.gpu


def test_calls_in_flight_together_equal_them_one_by_one_on_a_gpu():
    port = free_port()
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0",
                     extra_args=[*NO_WARMUP, "--metrics-port", str(port)]) as daemon:  # fmt: skip
        with KVRecallClient(daemon.target, "coalesced-gpu", timeout=120.0) as client:
            check_in_flight_equal_one_by_one(client, f"http://127.0.0.1:{port}/metrics", True, "cuda_ipc")
