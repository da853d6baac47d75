"""Worker selection on a GPU (the daemon's worker_selection): an engine's louiskv sessions on CUDA
IPC working sets map their unit tables, choose each crossing's retrieval on a stream of the
worker's (WorkerTable.choose, the Triton kernels) and the daemon places the choices, from the host
or with its kernels (staged or not); they decode the same tokens and logits, and close the same
segments, as on a daemon that chooses itself, with deferred eviction, overlap off and on (the CPU
test's scenario, tests/engine/test_worker_selection_engine.py)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_worker_selection_engine import ARMS, LABEL, PLACES, decode_arm
from tests.gpu import NO_WARMUP
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return {
        arm: decode_arm(tiny_llama, {**env, "KVRECALL_HOST_READS": "copy"}, device="cuda", deferred=True,
                        host_pool_gb=1.0, device_pool_gb=1.0, extra_args=list(NO_WARMUP))
        for arm, env in ARMS.items()
    }  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("arm", PLACES)
def test_the_workers_choice_decodes_as_the_daemons_on_a_gpu(runs, arm, overlap):
    worker, daemon = runs[arm], runs["daemon"]
    assert all(worker[overlap]["tables"]) and worker["worker_choices"][LABEL[arm]] > 0
    assert sum(daemon["worker_choices"].values()) == 0
    assert worker[overlap]["tokens"] == daemon[overlap]["tokens"]
    torch.testing.assert_close(worker[overlap]["logits"], daemon[overlap]["logits"], rtol=0, atol=1e-4)
    assert worker[overlap]["units"] == daemon[overlap]["units"]
