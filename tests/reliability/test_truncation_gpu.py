"""The CUDA IPC case of test_truncation: a worker whose staging memory disappears while the
daemon reads it (the worker frees it and dies mid-IngestPrompt) does not take the daemon or
another session with it. CUDA memory cannot be truncated; freeing it under the importer and
dying are what a worker can do."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from tests.gpu import NO_WARMUP
from tests.reliability.conftest import wait_for

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(num_layers=8, num_kv_heads=8, num_query_heads=32, head_dim=128, dtype=torch.bfloat16, max_tokens=16384)

DYING_WORKER = textwrap.dedent(
    """
    import os, signal, sys, threading, time, torch
    from kvrecall.client import KVRecallClient, ModelSpec
    from kvrecall.client import staging

    spec = ModelSpec(8, 8, 32, 128, torch.bfloat16, 16384)
    client = KVRecallClient(sys.argv[1], "dying", timeout=60.0)
    session = client.open_session(spec, "louiskv", {"budget": 512}, device="cuda:0", lease_seconds=2)
    kv = torch.randn(8, 2, 8, 16384, 128, device="cuda:0", dtype=torch.bfloat16)
    with staging.staged(kv, session.transport) as ref:
        request = session.core.ingest_request(16384)
        request.kv.CopyFrom(ref)
        future = client.stub.IngestPrompt.future(request, timeout=60.0, metadata=client._metadata)
        time.sleep(float(sys.argv[2]))
        print("DYING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the staging buffer was freed on leaving the block
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05])
def test_worker_freeing_ipc_staging_and_dying_mid_ingest(delay):
    with LocalDaemon(host_pool_gb=8.0, device_pool_gb=4.0, device="cuda:0", extra_args=NO_WARMUP) as daemon:
        with KVRecallClient(daemon.target, "bystander") as client:
            small = ModelSpec(2, 2, 4, 64, torch.bfloat16, 1024)
            with client.open_session(small, "full", device="cuda:0") as bystander:
                kv = torch.randn(2, 2, 2, 512, 64, device="cuda:0", dtype=torch.bfloat16)
                bystander.ingest(kv)
                worker = subprocess.run(
                    [sys.executable, "-c", DYING_WORKER, daemon.target, str(delay)],
                    capture_output=True, text=True, timeout=300,
                )
                assert worker.returncode == -signal.SIGKILL, worker.stderr[-3000:]
                assert daemon.process.poll() is None, daemon.log()[-3000:]
                assert client.health() == "SERVING"
                # the bystander decodes on with the right contents
                for position in range(512, 512 + bystander.spill_every):
                    bystander.write_token(position, kv[:, 0, :, position % 512], kv[:, 1, :, position % 512])
                    bystander.advance()
                torch.cuda.synchronize()
                assert bystander.stats().tokens == 512 + bystander.spill_every
                slots = (bystander.slot_pos[0, 0] >= 0).nonzero().flatten()
                positions = bystander.slot_pos[0, 0, slots].long()
                assert torch.equal(bystander.keys[0, 0, slots], kv[0, 0, 0, positions % 512])
                # the dead worker's session comes back within its lease
                with KVRecallClient(daemon.target, "") as operator:
                    assert wait_for(lambda: [s.worker_id for s in operator.stats().sessions] == ["bystander"], 10)
