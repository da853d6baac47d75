"""The Boundaries RPC through a real daemon: a step's notices and retrievals of many sessions
in one call leave every working set exactly as the same events sent one by one on each
session's Decode stream; a bad event refuses the call, names itself and changes nothing."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import InvalidArgumentError, KVRecallClientError, NotFoundError, StepCall
from kvrecall.client.core import ModelSpec
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.conftest import daemon_client, random_kv, random_query

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512)
RESIDENT = {"budget": 48, "n_sink": 4, "window": 32}
CASES = [
    ("louiskv", {**RESIDENT, "cluster_size": 8, "max_segment": 16}),
    ("quest", {**RESIDENT, "page_size": 8}),
    ("windowkv", {**RESIDENT, "window_size": 8, "group_size": 2, "keep_pruned_in_host": True}),
]
PROMPTS = (60, 150, 201, 260)  # 60: louiskv's units do not fill the budget
STEPS = 40


def open_ingested(client, policy: str, config: dict, tokens: int, seed: int, transport: str = "shm"):
    session = client.open_session(SPEC, policy, config, transport=transport)
    session.ingest(random_kv(SPEC, tokens, seed), random_query(SPEC, seed + 1, max(1, session.observation)))
    return session


def write_step(session, kv: torch.Tensor, query: torch.Tensor) -> None:
    """A worker's step: the new token's K/V into the ring, the query into the working set."""
    position = session.core.position
    kv = kv[:, :, :, position].to(session.keys.device)
    session.write_token(position, kv[:, 0], kv[:, 1])
    session.query.copy_(query)
    session.core.position += 1


def same_working_set(a, b) -> bool:
    return torch.equal(a.slot_pos, b.slot_pos) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_batch_equals_the_same_events_one_by_one(client):
    """Sessions of three policies and four prompt lengths: each step, one Boundaries call for
    the batched twins and per-session Decode calls for the others; the working sets stay
    bitwise equal. louiskv and quest each retrieve as one group; windowkv serves alone."""
    check_batch_equals_one_by_one(client, "shm")


@pytest.fixture(scope="module")
def inline_notices():
    """A daemon serving notice-only Boundaries calls on its event loop (notice_ops=inline)."""
    with daemon_client({"KVRECALL_NOTICE_OPS": "inline"}, timeout=30.0) as c:
        yield c


@pytest.mark.parametrize("ops", ["thread", "inline"])
def test_notices_in_a_call_of_their_own_equal_them_one_by_one(request, ops):
    """As the engine sends them: a step's notices in one call (which the daemon serves on its
    notice stream, in a thread or on its event loop), the retrievals in another. The answer
    says where the daemon's time went."""
    client = request.getfixturevalue("client" if ops == "thread" else "inline_notices")
    phases = check_batch_equals_one_by_one(client, "shm", split=True)
    assert phases, "some step sent notices alone"
    for seconds, queued, serve, sync in phases:
        assert min(queued, serve, sync) >= 0 and serve > 0
        assert queued + serve + sync <= seconds


def check_batch_equals_one_by_one(client, transport: str, split: bool = False) -> list[tuple[float, ...]]:
    """The test above for sessions of `transport` (tests/gpu runs it on a CUDA daemon).
    `split`: each step's notices go in a call of their own before its retrievals; returns the
    notice calls' (seconds, queued, serve, sync)."""
    phases = []
    twins = []
    for policy, config in CASES:
        for tokens in PROMPTS:
            seed = 10 * len(twins)
            twins.append((open_ingested(client, policy, config, tokens, seed, transport),
                          open_ingested(client, policy, config, tokens, seed, transport), tokens + STEPS, seed))  # fmt: skip
    try:
        gathered = 0
        for step in range(STEPS):
            calls = []
            for i, (batched, alone, length, seed) in enumerate(twins):
                kv = random_kv(SPEC, length, seed)
                query = torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                                    generator=torch.Generator().manual_seed(1000 * step + i)).to(batched.keys.device)  # fmt: skip
                write_step(batched, kv, query)
                write_step(alone, kv, query)
                notice = batched.core.needs_append()
                retrieve = step % 5 == 0 or (step + i) % 3 == 0
                if notice or retrieve:
                    calls.append(StepCall(batched, batched.core.position, notice, retrieve))
                if notice:
                    alone.append()
                if retrieve:
                    alone.boundary(position=alone.core.position)
            if split:
                notices = [StepCall(c.session, c.position, notice=True) for c in calls if c.notice]
                if notices:
                    answer = client.boundaries(notices)
                    assert answer.groups == 0
                    phases.append((answer.seconds, answer.queued_seconds, answer.serve_seconds, answer.sync_seconds))
                calls = [StepCall(c.session, c.position, retrieve=True) for c in calls if c.retrieve]
            response = client.boundaries(calls) if calls else pb.BoundariesResponse()
            gathered += sum(result.retrieval.tokens_gathered for result in response.results)
            if step % 5 == 0:  # everyone retrieves: louiskv, quest, and each windowkv alone
                assert response.groups == 2 + len(PROMPTS)
            for batched, alone, _, _ in twins:
                assert batched.core.noticed_upto == alone.core.noticed_upto
                assert same_working_set(batched, alone), f"{batched.policy_config} at step {step}"
        assert gathered > 0, "the retrievals moved tokens"
        for batched, alone, _, _ in twins:
            a, b = batched.stats(), alone.stats()
            assert (a.boundaries, a.appends, a.bytes_host_to_device) == (b.boundaries, b.appends, b.bytes_host_to_device)
        return phases
    finally:
        for batched, alone, _, _ in twins:
            batched.close()
            alone.close()


def raw(client, *events: pb.StepEvent) -> pb.BoundariesResponse:
    return client.call(client.stub.Boundaries, pb.BoundariesRequest(events=events))


def event(session, **fields) -> pb.StepEvent:
    base = {"session_id": session.session_id, "capability": session.capability, "position": session.core.position}
    return pb.StepEvent(**{**base, **fields})


@pytest.mark.parametrize(
    "make,error,field",
    [
        (lambda a, b: [event(a, retrieve=True), event(b, retrieve=True, session_id="s-00000000")],
         NotFoundError, "events[1].session_id"),
        (lambda a, b: [event(a, retrieve=True), event(b, retrieve=True, capability="wrong")],
         NotFoundError, "events[1].session_id"),
        (lambda a, b: [event(a, retrieve=True, position=a.core.position + 100), event(b, retrieve=True)],
         InvalidArgumentError, "events[0].position"),
        (lambda a, b: [event(a, retrieve=True), event(b, notice=True, position=1)],
         InvalidArgumentError, "events[1].position"),
        (lambda a, b: [event(a, retrieve=True), event(a, notice=True)], InvalidArgumentError, "events[1].session_id"),
        (lambda a, b: [event(a, retrieve=True), event(b)], InvalidArgumentError, "events[1].notice"),
        (lambda a, b: [], InvalidArgumentError, "events"),
        (lambda a, b: [event(a, retrieve=True, worker_copies=True, worker_selected=True)], InvalidArgumentError,
         "events[0].worker_selected"),  # (not a background call)
    ],
    ids=["unknown-session", "wrong-capability", "position-past", "notice-not-past", "twice", "empty-event", "none",
         "selected-in-foreground"],
)
def test_a_bad_event_refuses_the_call_names_it_and_changes_nothing(client, make, error, field):
    a = open_ingested(client, "louiskv", CASES[0][1], 150, 1)
    b = open_ingested(client, "quest", CASES[1][1], 201, 2)
    try:
        for session, tokens in ((a, 150), (b, 201)):
            write_step(session, random_kv(SPEC, tokens + 1, 3), torch.randn_like(session.query))
        before = [(s.slot_pos.clone(), s.keys.clone(), s.stats().boundaries) for s in (a, b)]
        with pytest.raises(error) as caught:
            raw(client, *make(a, b))
        assert field in str(caught.value)
        for session, (slot_pos, keys, boundaries) in zip((a, b), before, strict=True):
            assert torch.equal(session.slot_pos, slot_pos) and torch.equal(session.keys, keys)
            assert session.stats().boundaries == boundaries
        answer = client.boundaries([StepCall(a, a.core.position, retrieve=True), StepCall(b, b.core.position, retrieve=True)])
        assert len(answer.results) == 2 and answer.groups == 2  # the daemon carries on
    finally:
        a.close()
        b.close()


def test_inline_sessions_are_refused(client):
    """Their query and tokens travel inline: they use the Decode stream."""
    session = open_ingested(client, "louiskv", CASES[0][1], 150, 4, transport="inline")
    try:
        with pytest.raises(KVRecallClientError) as caught:
            raw(client, event(session, retrieve=True))
        assert "events[0].session_id" in str(caught.value) and "TRANSPORT_INLINE" in str(caught.value)
    finally:
        session.close()


def test_a_choice_of_a_session_that_maps_no_table_is_refused(client):
    """StepEvent.worker_selected names a table only a worker_selection daemon maps."""
    session = open_ingested(client, "louiskv", CASES[0][1], 150, 5)
    try:
        request = pb.BoundariesRequest(events=[event(session, retrieve=True, worker_copies=True, worker_selected=True)],
                                       background=True)  # fmt: skip
        with pytest.raises(InvalidArgumentError) as caught:
            client.call(client.stub.Boundaries, request)
        assert "events[0].worker_selected" in str(caught.value) and "maps no unit table" in str(caught.value)
    finally:
        session.close()
