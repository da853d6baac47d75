"""The daemon's `select_before_close` diagnostic (KVRECALL_SELECT_BEFORE_CLOSE=1), through a real
daemon: a louiskv boundary selects over the unit table as the notices left it and closes the open
output segment after, so that segment's tokens are not candidates of that retrieval but are of
the next; the default daemon closes first and retrieves them at once. Both through the Boundaries
RPC (on_boundaries) and a session's own Decode stream (on_boundary).

The decoded tokens' keys share a direction the boundary's query points along, so every unit
holding them outscores the prompt's and the budget takes them all: what is missing after a
retrieval is what was not a candidate."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import StepCall
from tests.conftest import daemon_client, random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, write_step

# max_segment 40 against notices every 16 tokens: a boundary finds an open segment of 16-32 tokens
CONFIG = {"budget": 128, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 40}
PROMPT, STEPS = 201, 64


@pytest.fixture(scope="module", params=["before-close", "default"])
def close_client(request):
    with daemon_client({"KVRECALL_SELECT_BEFORE_CLOSE": "1"} if request.param == "before-close" else {}) as c:
        yield c, request.param == "before-close"


def decoded_missing(session) -> list[set[int]]:
    """Per (layer, KV head) row: the decoded positions the working set does not hold."""
    decoded = set(range(PROMPT, session.core.position))
    rows = session.slot_pos.reshape(-1, session.slot_pos.shape[-1])
    return [decoded - set(row[row >= 0].tolist()) for row in rows]


@pytest.mark.parametrize("path", ["batch", "stream"])
def test_the_open_segment_is_a_candidate_of_the_boundary_unless_selected_first(close_client, path):
    client, first = close_client
    session = open_ingested(client, "louiskv", CONFIG, PROMPT, seed=11)
    kv = random_kv(SPEC, PROMPT + STEPS, 11)
    direction = torch.nn.functional.normalize(torch.randn(SPEC.head_dim, generator=torch.Generator().manual_seed(3)), dim=0)
    kv[:, 0, :, PROMPT:] += 8 * direction  # the decoded keys lean one way ...
    query = (8 * direction).expand(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim).contiguous()
    for _ in range(STEPS):
        write_step(session, kv, query)
        if session.core.needs_append():
            if path == "batch":
                client.boundaries([StepCall(session, session.core.position, notice=True)])
            else:
                session.append()

    def retrieve() -> list[set[int]]:  # ... and the boundary's query with them
        if path == "batch":
            client.boundaries([StepCall(session, session.core.position, retrieve=True)])
        else:
            session.boundary(position=session.core.position)
        return decoded_missing(session)

    ring = CONFIG["window"]
    assert session.core.noticed_upto - ring > PROMPT + 16, "decoded tokens left the window: the test exercises them"
    missing = retrieve()
    if first:
        assert all(missing), f"{path}: the open segment's tokens were candidates ({missing})"
        assert all(min(row) >= PROMPT + 16 for row in missing), "only the open segment's tokens are missing"
        assert not any(retrieve()), f"{path}: the segment closed after the first retrieval is a candidate of the next"
    else:
        assert not any(missing), f"{path}: the default daemon closes the segment first and retrieves it ({missing})"
    session.close()
