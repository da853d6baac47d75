"""The Boundaries RPC on a CUDA daemon (CUDA IPC working sets, the Triton kernels, one
placement launch per group): a batch leaves the working sets bitwise equal to the same
events sent one by one."""

from __future__ import annotations

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP
from tests.integration.test_boundaries_batch import check_batch_equals_one_by_one

pytestmark = pytest.mark.gpu


def test_a_batch_equals_the_same_events_one_by_one_on_a_gpu():
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP) as daemon:
        with KVRecallClient(daemon.target, "boundaries-gpu") as client:
            check_batch_equals_one_by_one(client, "cuda_ipc")


def test_notices_alone_on_the_notice_stream_equal_them_one_by_one_on_a_gpu():
    """A step's notices in a call of their own run on the daemon's notice stream, beside the
    retrievals on its default stream; the working sets stay bitwise equal."""
    with LocalDaemon(host_pool_gb=1.0, device_pool_gb=1.0, device="cuda:0", extra_args=NO_WARMUP) as daemon:
        with KVRecallClient(daemon.target, "boundaries-gpu") as client:
            phases = check_batch_equals_one_by_one(client, "cuda_ipc", split=True)
    assert phases and all(sync >= 0 and serve > 0 for _, _, serve, sync in phases)
