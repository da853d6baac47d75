"""Worker copies on a GPU (the daemon's worker_copy_share, placement_staged.py): background
retrievals leave their new rows in each session's staging area by the copy engine and the worker
copies them into their slots; at share 1 the staging area takes every row and the engine's
crossings read a light shadow (slot positions and query copied, keys and values in place). The
engine scenario of tests/engine/test_worker_copies_engine.py on CUDA IPC sessions: the same
tokens and logits with the daemon copying (share 0), the worker copying what fits (0.75) and the
worker copying everything (1), overlap off and on, and at share 1 its answers did stage rows."""

from __future__ import annotations

import pytest

from tests.engine.test_worker_copies_engine import SHARES, decode_shares
from tests.gpu import NO_WARMUP
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return decode_shares(tiny_llama, SHARES, device="cuda", env={"KVRECALL_HOST_READS": "copy"}, host_pool_gb=1.0,
                         device_pool_gb=1.0, extra_args=NO_WARMUP)  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("share", SHARES[1:])
def test_worker_copies_decode_as_the_daemons_copies(runs, share, overlap):
    plain, copied = runs[0.0, overlap], runs[share, overlap]
    assert not any(plain["areas"]) and not plain["staged"], "share 0: no staging area, nothing staged"
    assert all(copied["areas"]), "every session maps a staging area"
    assert all(copied["lights"]) == (share == 1.0) and any(copied["lights"]) == (share == 1.0), \
        "a light shadow exactly where every row is staged"
    if share == 1.0:  # (at 0.75 a retrieval's rows may or may not fit: either way the tokens agree)
        assert copied["staged"] > 0, "the worker copied no row: the test tells nothing"
    assert copied["tokens"] == plain["tokens"]
    assert (copied["logits"] - plain["logits"]).abs().max().item() < 1e-5
