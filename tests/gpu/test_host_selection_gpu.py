"""Host selection on a GPU (the daemon's host_selection, server/host_selection.py): an engine's
louiskv sessions on CUDA IPC working sets, every crossing's rows staged for the worker (share 1),
decode the same tokens and logits whether the daemon selects with its kernels or on the host from
its copy of the unit table (the CPU test's scenario, tests/engine/test_host_selection_engine.py),
overlap off and on, and the host did select."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_host_selection_engine import decode_host_selection
from tests.gpu import NO_WARMUP
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return {
        host: decode_host_selection(tiny_llama, host, device="cuda", env={"KVRECALL_HOST_READS": "copy"},
                                    host_pool_gb=1.0, device_pool_gb=1.0, extra_args=list(NO_WARMUP))
        for host in (False, True)
    }  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
def test_host_selection_decodes_as_the_device_selection(runs, overlap):
    device, host = runs[False], runs[True]
    assert device["host_selections"] == 0 and host["host_selections"] > 0
    assert host[overlap]["staged"] > 0 and all(host[overlap]["lights"])
    assert host[overlap]["tokens"] == device[overlap]["tokens"]
    torch.testing.assert_close(host[overlap]["logits"], device[overlap]["logits"], rtol=0, atol=1e-4)
