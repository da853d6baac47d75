"""The daemon's `dry_retrievals` diagnostic (KVRECALL_DRY_RETRIEVALS=1), through a real daemon:
a retrieval event is answered without retrieving (the working set keeps every byte it held and
the answer reports nothing placed) while the notice riding in the same event is still served;
the default daemon retrieves for the same events."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import StepCall
from tests.conftest import daemon_client, random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, write_step

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 16}
PROMPT = 201


@pytest.fixture(scope="module", params=["dry", "default"])
def dry_client(request):
    with daemon_client({"KVRECALL_DRY_RETRIEVALS": "1"} if request.param == "dry" else {}) as c:
        yield c, request.param == "dry"


def test_a_dry_retrieval_places_nothing_and_serves_its_notice(dry_client):
    client, dry = dry_client
    session = open_ingested(client, "louiskv", CONFIG, PROMPT, seed=7)
    kv = random_kv(SPEC, PROMPT + 40, 7)
    placed = 0
    for step in range(40):
        write_step(session, kv, torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                                            generator=torch.Generator().manual_seed(step)))  # fmt: skip
        notice = session.core.needs_append()
        if not (notice or step % 5 == 4):
            continue
        before = [t.clone() for t in (session.keys, session.values, session.slot_pos)]
        noticed = session.core.noticed_upto
        answer = client.boundaries([StepCall(session, session.core.position, notice=notice, retrieve=True)])
        result = answer.results[0]
        placed += result.retrieval.tokens_placed
        if notice:
            assert result.append.spilled_upto == session.core.position > noticed, "the notice is served"
        elif dry:
            after = (session.keys, session.values, session.slot_pos)
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), f"step {step}: bytes changed"
        if dry:
            assert (result.retrieval.units_selected, result.retrieval.tokens_placed,
                    result.retrieval.bytes_moved) == (0, 0, 0)  # fmt: skip
    assert session.core.noticed_upto > PROMPT, "no notice fell due: the test exercises none"
    if not dry:
        assert placed > 0, "the default daemon retrieved nothing: the test cannot tell dry from not"
    session.close()
