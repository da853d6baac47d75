"""A daemon whose louiskv unit tables store their representatives in float8 e4m3
(unit_reps_dtype fp8, KVRECALL_UNIT_REPS_DTYPE): real daemons, real gRPC. The same sessions
(prompt, decode writes and queries; two a daemon, retrieving in one call) on a daemon of each
dtype: the fp8 one reserves and shows the smaller table, its retrievals answer and fill the
working set, and they keep most of what the 16-bit (here f32) table's retrievals keep."""

from __future__ import annotations

import pytest

from kvrecall.client import StepCall
from kvrecall.client.core import policy_message
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies import build_policy, louiskv
from tests.conftest import daemon_client, random_kv, random_query
from tests.integration.test_boundaries_batch import SPEC, write_step

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 16}
PROMPT, STEPS, RETRIEVE_EVERY = 260, 40, 8


@pytest.fixture(scope="module")
def clients():
    with daemon_client({}, timeout=30.0) as layout, daemon_client({"KVRECALL_UNIT_REPS_DTYPE": "fp8"}, timeout=30.0) as fp8:
        yield layout, fp8


def metadata_bytes(fp8: bool, monkeypatch) -> int:
    monkeypatch.setattr(louiskv, "_fp8_reps", fp8)
    layout = ModelLayout(SPEC.num_layers, SPEC.num_kv_heads, SPEC.num_query_heads, SPEC.head_dim, SPEC.dtype,
                         max_tokens=SPEC.max_tokens)  # fmt: skip
    return build_policy(policy_message("louiskv", CONFIG), layout).metadata_bytes()


def retrieved(session) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in session.slot_pos.reshape(-1, session.slot_pos.shape[-1]).cpu()]


def test_an_fp8_table_is_smaller_and_retrieves_most_of_what_a_16_bit_one_does(clients, monkeypatch):
    """Two sessions a daemon, retrieving in one call (louiskv selects them stacked)."""
    full_bytes, fp8_bytes = metadata_bytes(False, monkeypatch), metadata_bytes(True, monkeypatch)
    assert fp8_bytes < full_bytes
    kvs = [random_kv(SPEC, PROMPT + STEPS, seed=seed) for seed in (5, 7)]
    sessions = []  # per daemon: (client, [its two sessions])
    for client, want in zip(clients, (full_bytes, fp8_bytes), strict=True):
        mine = []
        for kv in kvs:
            session = client.open_session(SPEC, "louiskv", CONFIG, transport="shm")
            session.ingest(kv[:, :, :, :PROMPT].contiguous(), random_query(SPEC, 6, max(1, session.observation)))
            assert session.stats().metadata_bytes == want
            mine.append(session)
        sessions.append((client, mine))
    kept, total = 0, 0
    for step in range(STEPS):
        retrieve = step % RETRIEVE_EVERY == RETRIEVE_EVERY - 1
        for client, mine in sessions:
            for kv, session in zip(kvs, mine, strict=True):
                write_step(session, kv, random_query(SPEC, 100 + step, 1)[:, :, 0])
            client.boundaries([StepCall(session, session.core.position, notice=True, retrieve=retrieve) for session in mine])
        if retrieve:
            (_, full), (_, small) = sessions
            for a_session, b_session in zip(full, small, strict=True):
                for a, b in zip(retrieved(a_session), retrieved(b_session), strict=True):
                    assert len(b) >= 0.9 * len(a)  # the fp8 session's working set is about as full
                    kept, total = kept + len(a & b), total + max(len(a), len(b))
    assert total > 0
    assert kept / total >= 0.8, f"the fp8 table's retrievals kept {kept} of {total} positions"
    for _, mine in sessions:
        for session in mine:
            session.close()
