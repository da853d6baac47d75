"""Worker copies through a real daemon (a CPU one: the PyTorch reference stages the rows, as the
GPU's copy engine does in placement_staged.copy_staged): with worker_copy_share a shared-memory
session maps a staging area; a background retrieval event asking for worker copies leaves the
session's keys and values as they were, its rows and targets staged (RetrievalResult.staged_rows),
and once the SDK copies them the working set equals a twin's that the daemon placed itself. A
share too small for a retrieval's rows falls back to the daemon's copies; share 0 maps nothing."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import StepCall
from tests.conftest import daemon_client, random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, same_working_set, write_step

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 16}
PROMPT = 201


@pytest.fixture(scope="module", params=[1.0, 0.05, 0.0])
def share_client(request):
    with daemon_client({"KVRECALL_WORKER_COPY_SHARE": str(request.param)}) as c:
        yield request.param, c


def test_staged_rows_wait_for_the_worker_and_then_equal_the_daemons_placement(share_client):
    share, client = share_client
    asked, plain = (open_ingested(client, "louiskv", CONFIG, PROMPT, seed=3) for _ in range(2))
    assert (asked.core.staging is not None) == (share > 0)
    assert asked.core.stages_every_row == (share == 1.0)
    kv = random_kv(SPEC, PROMPT + 12, 3)
    gathered = staged = 0
    for step in range(12):
        query = torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                            generator=torch.Generator().manual_seed(step))  # fmt: skip
        for session in (asked, plain):
            write_step(session, kv, query)
        if step % 4 != 3:
            continue
        before = (asked.keys.clone(), asked.values.clone())
        pending = client.boundaries_future([StepCall(asked, asked.core.position, retrieve=True)], background=True,
                                           worker_copies=True, apply_staged=False)  # fmt: skip
        rows = pending.staged_rows(asked)
        other = client.boundaries_future([StepCall(plain, plain.core.position, retrieve=True)], background=True)
        first, second = pending.result().results[0].retrieval, other.result().results[0].retrieval
        assert second.staged_rows == 0 and rows == first.staged_rows
        assert (first.tokens_placed, first.tokens_gathered) == (second.tokens_placed, second.tokens_gathered)
        if rows:
            assert rows == first.tokens_gathered, "every new row staged (K and V count once)"
            assert torch.equal(asked.keys, before[0]) and torch.equal(asked.values, before[1]), "rows in place"
            assert not same_working_set(asked, plain)
            asked.core.apply_staged(rows)
        assert same_working_set(asked, plain)
        gathered += first.tokens_gathered
        staged += rows
    assert gathered > 0, "nothing was gathered: the test tells nothing"
    if share == 1.0:
        assert staged == gathered, "a whole retrieved region's staging area takes every row"
    elif share < 0.1:
        assert staged < gathered, "a small staging area never fell back: the test tells nothing"
    asked.close()
    plain.close()
