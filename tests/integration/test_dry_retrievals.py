"""The daemon's `dry_retrievals` diagnostic (KVRECALL_DRY_RETRIEVALS=1), through a real daemon:
a retrieval event is answered without retrieving (the working set keeps every byte it held and
the answer reports nothing placed) while the notice riding in the same event is still served;
the default daemon retrieves for the same events. With `dry_retrievals_close` a dry retrieval still
closes louiskv's open output segment into a unit (a plain dry one closes nothing); `dry_launches`
is dry too (its stand-in kernels: test_spin_kernels)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import StepCall
from tests.conftest import daemon_client, random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, write_step

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 64}
PROMPT = 201


MODES = {"dry": {"KVRECALL_DRY_RETRIEVALS": "1"}, "dry-close": {"KVRECALL_DRY_RETRIEVALS_CLOSE": "1"},
         "dry-launches": {"KVRECALL_DRY_LAUNCHES": "3"}, "default": {}}


@pytest.fixture(scope="module", params=list(MODES))
def dry_client(request):
    with daemon_client(MODES[request.param]) as c:
        yield c, request.param


def test_a_dry_retrieval_places_nothing_and_serves_its_notice(dry_client):
    client, mode = dry_client
    dry = mode != "default"
    closed = 0  # retrievals after which the session held more units (a notice alone closes a segment only at
    # max_segment, 64 tokens: not within these 40 steps)
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
        noticed, units = session.core.noticed_upto, session.stats().units
        answer = client.boundaries([StepCall(session, session.core.position, notice=notice, retrieve=True)])
        result = answer.results[0]
        closed += session.stats().units > units
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
    if mode in ("dry", "dry-launches"):
        assert closed == 0, "a dry retrieval closed a segment"
    else:  # (the default closes the open segment before it selects, as dry_retrievals_close does alone)
        assert closed > 0, "no retrieval closed a segment"
    session.close()


def test_spin_kernels_launch_the_count_asked():
    """dry_launches' stand-in kernels (step_batch.spin_kernels): on a CPU each is a one-element add."""
    from kvrecall.server import step_batch

    device = torch.device("cpu")
    before = int(step_batch.spin_kernels(device, 0, 0))
    assert int(step_batch.spin_kernels(device, 5, 1000)) == before + 5
    assert int(step_batch.spin_kernels(device, 2, 0)) == before + 7


def test_dry_launches_out_of_range_is_refused_naming_the_setting():
    from pydantic import ValidationError

    from kvrecall.server.config import ServerConfig

    with pytest.raises(ValidationError, match="dry_launches"):
        ServerConfig(dry_launches=-1)
