"""StepEvent.worker_copies where no staging area exists, through a real daemon: a CPU daemon
with worker_copy_share set gives its shared-memory sessions none (staging is for CUDA IPC
sessions, tests/gpu/test_worker_copies_gpu.py), so an event asking for worker copies is served
as one that does not: the same placement, nothing staged, the working set written by the daemon."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, StepCall
from kvrecall.local import LocalDaemon
from tests.conftest import random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, write_step

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 16}
PROMPT = 201


@pytest.fixture(scope="module")
def client():
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={"KVRECALL_WORKER_COPY_SHARE": "0.5"}) as d:
        with KVRecallClient(d.target, "test-worker", timeout=60.0) as c:
            yield c


def test_an_event_asking_for_worker_copies_without_a_staging_area_is_placed_by_the_daemon(client):
    asked, plain = (open_ingested(client, "louiskv", CONFIG, PROMPT, seed=3) for _ in range(2))
    assert asked.core.staging is None and plain.core.staging is None
    kv = random_kv(SPEC, PROMPT + 12, 3)
    placed = 0
    for step in range(12):
        query = torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                            generator=torch.Generator().manual_seed(step))  # fmt: skip
        for session in (asked, plain):
            write_step(session, kv, query)
        if step % 4 != 3:
            continue
        answers = [
            client.boundaries_future([StepCall(session, session.core.position, retrieve=True)], background=True,
                                     worker_copies=worker_copies).result()
            for session, worker_copies in ((asked, True), (plain, False))
        ]  # fmt: skip
        first, second = (answer.results[0].retrieval for answer in answers)
        assert first.staged_rows == second.staged_rows == 0
        assert (first.tokens_placed, first.tokens_gathered) == (second.tokens_placed, second.tokens_gathered)
        placed += first.tokens_gathered
        for a, b in zip((asked.keys, asked.values, asked.slot_pos), (plain.keys, plain.values, plain.slot_pos),
                        strict=True):  # fmt: skip
            assert torch.equal(a, b)
    assert placed > 0, "nothing was gathered: the test tells nothing"
    asked.close()
    plain.close()
