"""A retrieval is idempotent, through a real daemon: asked again at the same position for the
same query (no token written, no notice between), it finds its whole choice resident and
gathers nothing from the host tier, for every policy that retrieves. Decode steps and their
notices run between the pairs, so the pairs meet segments closed, pages filled and slots evicted.

(Why bench e2e's `--query-drift 0.001` still moves ~0.14-0.2 of a budget: it sets each query head
to its step's norm, and louiskv's `max` over a KV head's query heads re-ranks units when those
norms change; the same query again moves nothing, as here.)"""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import StepCall
from tests.conftest import random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, write_step

RESIDENT = {"budget": 64, "n_sink": 4, "window": 32}
CASES = [
    ("louiskv", {**RESIDENT, "cluster_size": 8, "max_segment": 16, "min_gap": 0}),
    ("quest", {**RESIDENT, "page_size": 8}),
]
PROMPT, STEPS, GAP = 400, 96, 8


@pytest.mark.parametrize(("policy", "config"), CASES)
def test_the_same_retrieval_again_gathers_nothing(client, policy, config):
    session = open_ingested(client, policy, config, PROMPT, seed=1)
    kv = random_kv(SPEC, PROMPT + STEPS, 1)
    first, again = [], []
    for step in range(STEPS):
        query = torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                            generator=torch.Generator().manual_seed(step))  # fmt: skip
        write_step(session, kv, query)
        if session.core.needs_append():
            client.boundaries([StepCall(session, session.core.position, notice=True)])
        if step % GAP == GAP - 1:
            for out in (first, again):
                answer = client.boundaries([StepCall(session, session.core.position, retrieve=True)])
                out.append(answer.results[0].retrieval.tokens_gathered)
    session.close()
    assert sum(first) > 0, "no retrieval moved anything: the test tells nothing"
    assert again == [0] * len(again), f"{policy}: a repeated retrieval gathered {again} (first: {first})"
