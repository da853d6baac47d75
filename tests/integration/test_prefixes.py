"""Shared prefixes against a real daemon (random KV, no model): sessions over one held prefix
behave exactly like sessions that ingested it themselves; references, tenants, eviction, and
bad declarations answered with a status naming the field."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import (
    FailedPreconditionError,
    InvalidArgumentError,
    KVRecallClient,
    ModelSpec,
    NotFoundError,
    ResourceExhaustedError,
)
from kvrecall.client.staging import StagingBuffer
from kvrecall.local import LocalDaemon
from kvrecall.prefix import declare
from tests.conftest import random_kv, random_query

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=400)
DOC, QUESTION = 200, 24
DOC_IDS = list(range(1000, 1000 + DOC))
POLICIES = [("louiskv", {"budget": 48, "window": 32, "n_sink": 4}), ("quest", {"budget": 48, "window": 32})]
FINGERPRINT = "random-kv-model"


def ingest(session, spec: ModelSpec = SPEC, device: str = "cpu") -> None:
    n_obs = max(1, session.observation)
    session.ingest(random_kv(spec, DOC, seed=7).to(device), random_query(spec, 3, n_obs).to(device))


def state(session) -> tuple[torch.Tensor, ...]:
    """What the worker's attention reads: the working set (copies)."""
    return tuple(t.clone() for t in (session.slot_pos, session.keys, session.values))


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def send_chunk(session, kv: torch.Tensor) -> None:
    """kv [L, 2, H, n, D] as the session's next chunk, through a staging buffer."""
    buffer = StagingBuffer(tuple(kv.shape), kv.dtype, session.transport, kv.device)
    buffer.tensor.copy_(kv)
    try:
        session.chunk(buffer)
    finally:
        buffer.release()


def question_and_retrieval(session, seed: int, spec: ModelSpec = SPEC, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """The question as a chunk (with its retrieval for the chunk's queries), then a boundary."""
    kv = random_kv(spec, QUESTION, seed=seed).to(device)
    session.boundary(queries=random_query(spec, seed + 1, n_obs=8).to(device))
    send_chunk(session, kv)
    session.query.copy_(random_query(spec, seed + 2)[:, :, 0].to(device))
    session.boundary()
    return state(session)


def open_on(client, policy, config, *, ids=DOC_IDS, fingerprint=FINGERPRINT, spec=SPEC, **extra):
    return client.open_session(spec, policy, config, prefix=declare(ids, fingerprint, chunk_tokens=64, **extra))


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_sessions_on_a_shared_prefix_match_sessions_that_ingested_it(daemon, policy, config):
    with KVRecallClient(daemon.target, f"prefix-exact-{policy}") as client:
        with client.open_session(SPEC, policy, config) as alone:
            ingest(alone)
            after_ingest = state(alone)
            expected = [question_and_retrieval(alone, seed) for seed in (11, 21)]
        first = open_on(client, policy, config)
        assert first.prefix_held == 0
        ingest(first)
        assert_same(state(first), after_ingest)
        second = open_on(client, policy, config)
        assert second.prefix_held == DOC and second.position == DOC
        assert_same(state(second), after_ingest)  # as if it had ingested the document
        third = open_on(client, policy, config)
        assert_same(question_and_retrieval(second, 11), expected[0])
        assert_same(question_and_retrieval(third, 11), expected[0])
        second.close()  # closing one leaves the others intact
        assert_same(question_and_retrieval(third, 21), expected[1])
        assert_same(question_and_retrieval(first, 11), expected[0])
        held = [p for p in client.stats().prefixes if p.prefix_id == first.info.prefix_id]
        assert len(held) == 1 and held[0].refs == 2 and held[0].hits == 2 and held[0].tokens == DOC
        third.close()
        first.close()
        assert [p.refs for p in client.stats().prefixes if p.prefix_id == first.info.prefix_id] == [0]


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_a_longer_prompt_starts_from_the_longest_held_prefix_that_begins_it(daemon, policy, config):
    """A chat's next turn: its declared tokens go on past a held prefix. The session starts after
    the held part (prefix_tokens_held) and continues exactly like a session that ingested that
    part itself; tokens that only share a first chunk with a held prefix hit nothing."""
    turn = list(range(5000, 5000 + QUESTION))
    with KVRecallClient(daemon.target, f"prefix-longest-{policy}") as client:
        with client.open_session(SPEC, policy, config) as alone:
            ingest(alone)
            after_ingest = state(alone)
            expected = question_and_retrieval(alone, 11)
        first = open_on(client, policy, config)
        ingest(first)
        short = open_on(client, policy, config, ids=DOC_IDS[:100])  # held too, shorter than DOC
        assert short.prefix_held == 0
        short.ingest(random_kv(SPEC, 100, seed=5), random_query(SPEC, 3, max(1, short.observation)))
        with open_on(client, policy, config, ids=DOC_IDS + turn) as longer:
            assert longer.prefix_held == DOC and longer.position == DOC  # the longest that begins it
            assert longer.info.prefix_id == first.info.prefix_id
            assert_same(state(longer), after_ingest)
            assert_same(question_and_retrieval(longer, 11), expected)
        with open_on(client, policy, config, ids=DOC_IDS[:150] + turn + DOC_IDS[150:]) as other:
            assert other.prefix_held == 100  # DOC diverges at 150: only the 100-token prefix begins it
        with open_on(client, policy, config, ids=DOC_IDS[:70] + turn) as diverged:
            assert diverged.prefix_held == 0  # the first 64-token chunk is shared, no held prefix begins it
        with pytest.raises(NotFoundError, match="prefix.chunk_hashes"):  # the whole of it
            open_on(client, policy, config, ids=DOC_IDS + turn[::-1], must_be_held=True)
        refs = {p.prefix_id: p.refs for p in client.stats().prefixes}
        # the first session's, and the one the longer session registered after its turn's chunk
        assert refs[first.info.prefix_id] == 2 and len(refs) == 3
        first.close()
        short.close()


def canonical(state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A working set with each row's slots sorted by position, free slots zeroed: two sessions
    that hold the same tokens (placed in other free slots) compare equal."""
    slot_pos, keys, values = state
    order = slot_pos.argsort(dim=-1, stable=True)
    empty = (slot_pos.gather(2, order) < 0)[..., None]  # what a free slot holds is never read
    take = lambda t: t.gather(2, order[..., None].expand_as(t)).masked_fill(empty, 0)  # noqa: E731
    return slot_pos.gather(2, order), take(keys), take(values)


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_a_turn_over_a_held_prefix_registers_its_own_for_the_next_turn(daemon, policy, config):
    """A chat: turn 2 starts after the held document and appends its own tokens as one chunk up
    to its declared end, which registers the longer prefix; turn 3 starts after it, holding
    what turn 2 held there, and both go on alike. The new prefix holds the document's
    prefix while it lives."""
    with KVRecallClient(daemon.target, f"prefix-chain-{policy}") as client:
        check_turn_chain(client, policy, config)


def check_turn_chain(client, policy: str, config: dict, spec: ModelSpec = SPEC, device: str = "cpu") -> None:
    """The test above on `device` (tests/gpu runs it on a CUDA daemon)."""
    turn = list(range(5000, 5000 + QUESTION))
    opened = {"device": device} if device != "cpu" else {}
    declared = lambda ids: client.open_session(spec, policy, config, prefix=declare(ids, FINGERPRINT, chunk_tokens=64),  # noqa: E731
                                               **opened)  # fmt: skip
    first = declared(DOC_IDS)
    ingest(first, spec, device)
    second = declared(DOC_IDS + turn)
    assert second.prefix_held == DOC
    second.boundary(queries=random_query(spec, 32, n_obs=8).to(device))
    send_chunk(second, random_kv(spec, QUESTION, seed=31).to(device))  # [DOC, DOC + QUESTION): the declared end
    at_end = canonical(state(second))
    held = {p.tokens: p for p in client.stats().prefixes}
    assert sorted(held) == [DOC, DOC + QUESTION]
    longer, document = held[DOC + QUESTION], held[DOC]
    assert (longer.refs, document.refs) == (1, 2)  # second's; first's and the longer prefix's
    assert longer.host_bytes > 0  # its own pages (test_a_chained_prefix_owns_its_own_pages_only)
    third = declared(DOC_IDS + turn + [7, 8])
    assert third.prefix_held == DOC + QUESTION and third.position == DOC + QUESTION
    assert third.info.prefix_id == longer.prefix_id
    for x, y in zip(canonical(state(third)), at_end, strict=True):
        assert torch.equal(x, y)
    for seed in (41, 51):  # both go on alike: a chunk with its retrieval, then a boundary
        a = canonical(question_and_retrieval(second, seed, spec, device))
        b = canonical(question_and_retrieval(third, seed, spec, device))
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    second.close()
    third.close()
    first.close()
    refs = {p.tokens: p.refs for p in client.stats().prefixes}
    assert refs == {DOC: 1, DOC + QUESTION: 0}  # cached; the longer one holds the document


def test_a_held_prefix_costs_its_host_pages_once(daemon):
    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "prefix-bytes") as client:
        with open_on(client, policy, config) as first:
            ingest(first)
            own_first = first.stats().host_bytes
            with open_on(client, policy, config) as second:
                stats = second.stats()
                prefix = next(p for p in client.stats().prefixes if p.prefix_id == second.info.prefix_id)
                assert stats.prefix_id == prefix.prefix_id and stats.prefix_tokens == DOC
                assert stats.host_bytes == own_first  # its own pages: the rest of max_tokens only
                assert prefix.host_bytes > 0
                # louiskv's unit table is shared read-only: the session reserves only what it adds
                assert 0 < stats.metadata_bytes < first.stats().metadata_bytes


def test_a_shared_index_retrieves_like_its_own_in_one_boundaries_call(daemon):
    """A session over a held prefix (louiskv's unit table shared with the prefix) and one that
    ingested the document itself, retrieving for the same query in ONE Boundaries call (their
    tables stacked together), end with the same working set, right after the document and
    again after decode tokens closed a segment into a unit of the session's own (a chunk's
    units: test_sessions_on_a_shared_prefix_match_sessions_that_ingested_it)."""
    from kvrecall.client.session import StepCall

    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "prefix-batched") as client:
        with open_on(client, policy, config) as first:
            ingest(first)
            with client.open_session(SPEC, policy, config) as alone, open_on(client, policy, config) as shared:
                ingest(alone)
                assert shared.prefix_held == DOC
                for session in (alone, shared):
                    session.query.copy_(random_query(SPEC, 5)[:, :, 0])
                client.boundaries([StepCall(alone, DOC, retrieve=True), StepCall(shared, DOC, retrieve=True)])
                assert_same(state(shared), state(alone))
                # Decode tokens whose keys all point one way, and a query that way: the segment they
                # close into (a unit of the session's own table) must win the next retrieval.
                direction = torch.randn(SPEC.head_dim, generator=torch.Generator().manual_seed(3))
                for step in range(32):  # notices evict them; the boundary closes the segment
                    kv = random_kv(SPEC, 1, seed=100 + step)
                    keys = (4 * direction).expand(SPEC.num_layers, SPEC.num_kv_heads, SPEC.head_dim)
                    for session in (alone, shared):
                        session.write_token(DOC + step, keys, kv[:, 1, :, 0])
                        session.core.position = DOC + step + 1
                    if (step + 1) % 16 == 0:
                        client.boundaries([StepCall(s, DOC + step + 1, notice=True) for s in (alone, shared)])
                for session in (alone, shared):
                    session.query.copy_(direction.expand(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim))
                client.boundaries([StepCall(alone, DOC + 32, retrieve=True), StepCall(shared, DOC + 32, retrieve=True)])
                assert shared.stats().units > first.stats().units  # a segment closed into a unit of its own
                assert alone.stats().units == shared.stats().units
                assert_same(state(shared), state(alone))
                decoded = set(range(DOC, DOC + 16))
                assert decoded <= set(state(shared)[0][0, 0].tolist())  # the segment was retrieved


def test_inline_sessions_get_the_prefix_working_set_in_the_answer(daemon):
    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "prefix-inline") as client:
        with open_on(client, policy, config) as first:
            ingest(first)
            expected = state(first)
            with client.open_session(
                SPEC, policy, config, transport="inline", prefix=declare(DOC_IDS, FINGERPRINT, chunk_tokens=64)
            ) as mirror:
                assert mirror.prefix_held == DOC
                assert_same(state(mirror), expected)


def test_another_tenant_with_the_same_tokens_ingests_its_own(daemon):
    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "tenant-one") as one, KVRecallClient(daemon.target, "tenant-two") as two:
        with open_on(one, policy, config) as mine:
            ingest(mine)
            with pytest.raises(NotFoundError, match="prefix.chunk_hashes"):  # the other tenant's is invisible
                open_on(two, policy, config, must_be_held=True)
            with open_on(two, policy, config) as theirs:
                assert theirs.prefix_held == 0
                ingest(theirs)
                assert theirs.stats().prefix_id == mine.stats().prefix_id  # same tokens, two copies
            assert [(p.worker_id, p.refs) for p in two.stats().prefixes] == [("tenant-two", 0)]
            assert [(p.worker_id, p.refs) for p in one.stats().prefixes] == [("tenant-one", 1)]


def test_a_forged_hash_is_refused_and_never_served(daemon):
    policy, config = POLICIES[0]
    other = [t + 1 for t in DOC_IDS]
    with KVRecallClient(daemon.target, "prefix-forger") as client:
        with open_on(client, policy, config) as honest:
            ingest(honest)
            forged = declare(other, FINGERPRINT, chunk_tokens=64)
            forged.chunk_hashes[:] = declare(DOC_IDS, FINGERPRINT, chunk_tokens=64).chunk_hashes
            with pytest.raises(InvalidArgumentError, match="prefix.chunk_hashes"):
                client.open_session(SPEC, policy, config, prefix=forged)
            prefix = next(p for p in client.stats().prefixes if p.prefix_id == honest.info.prefix_id)
            assert prefix.refs == 1 and prefix.hits == 0
            assert len(client.stats().sessions) == 1


def test_bad_declarations_name_the_field(daemon):
    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "prefix-bad") as client:
        with pytest.raises(NotFoundError, match="prefix.chunk_hashes"):
            open_on(client, policy, config, ids=[5, 6, 7], must_be_held=True)
        with open_on(client, policy, config) as held:
            ingest(held)
            with pytest.raises(FailedPreconditionError, match="prefix.fingerprint"):
                open_on(client, policy, config, fingerprint="another-model", must_be_held=True)
            longer = ModelSpec(**{**SPEC.__dict__, "max_tokens": 512})
            with pytest.raises(FailedPreconditionError, match="layout"):
                open_on(client, policy, config, spec=longer, must_be_held=True)
            with pytest.raises(FailedPreconditionError, match="policy"):
                open_on(client, policy, {**config, "budget": 40}, must_be_held=True)
        short = ModelSpec(**{**SPEC.__dict__, "max_tokens": DOC - 1})
        with pytest.raises(InvalidArgumentError, match="prefix.token_ids"):
            open_on(client, policy, config, spec=short)
        with pytest.raises(InvalidArgumentError, match="prefix.fingerprint"):
            open_on(client, policy, config, fingerprint="")
        bad = declare(DOC_IDS, FINGERPRINT, chunk_tokens=64)
        del bad.chunk_hashes[-1]
        with pytest.raises(InvalidArgumentError, match="prefix.chunk_hashes"):
            client.open_session(SPEC, policy, config, prefix=bad)
        with open_on(client, policy, config, ids=DOC_IDS[:50]) as wrong_length:
            with pytest.raises(InvalidArgumentError, match="num_tokens"):
                ingest(wrong_length)
        assert client.stats().sessions == []


def test_admission_evicts_cached_prefixes_never_used_ones():
    """A host pool of 32 pages of 4 tokens (4 KiB); a session reserves 25 of them and a
    30-token prefix 8 (7 full pages and a copy of the partial one): a cached prefix is evicted
    to admit the next session, a referenced one never."""
    spec = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=2, head_dim=32, dtype=torch.float32, max_tokens=100)
    with LocalDaemon(host_pool_gb=128 / (1 << 20), device_pool_gb=1 / 64, extra_args=["--page-kb", "4"]) as d:
        with KVRecallClient(d.target, "evict-worker") as client:
            ids_a, ids_b = list(range(30)), list(range(100, 130))
            kv = random_kv(spec, 30, seed=1)
            with client.open_session(spec, "full", prefix=declare(ids_a, FINGERPRINT)) as a:
                a.ingest(kv)
            assert [(p.tokens, p.refs) for p in client.stats().prefixes] == [(30, 0)]  # cached
            with client.open_session(spec, "full", prefix=declare(ids_a, FINGERPRINT)) as hit:
                assert hit.prefix_held == 30
                host = next(p for p in client.stats().pools if p.tier == "host")
                assert host.used_bytes == (8 + 25 - 7) * 4096  # the prefix's pages and the session's own
                with pytest.raises(ResourceExhaustedError, match="host pool"):  # in use: not evicted
                    client.open_session(spec, "full", prefix=declare(ids_b, FINGERPRINT))
            with client.open_session(spec, "full", prefix=declare(ids_b, FINGERPRINT)) as b:
                assert b.prefix_held == 0
                stats = client.stats()
                assert stats.prefix_evictions == 1 and stats.prefixes == []
                b.ingest(random_kv(spec, 30, seed=2))
            assert [p.tokens for p in client.stats().prefixes] == [30]
            with client.open_session(spec, "full", prefix=declare(ids_b, FINGERPRINT)) as again:
                assert again.prefix_held == 30
            host = next(p for p in client.stats().pools if p.tier == "host")
            assert host.used_bytes == 8 * 4096  # the cached prefix: 7 full pages and its partial one


def test_a_chained_prefix_owns_its_own_pages_only():
    """Pages of 4 tokens: a 30-token prefix owns 7 full pages and a copy of its partial one; a
    session over it that appends 10 tokens registers a 40-token prefix owning pages 7-9 only.
    Admission evicts the longer prefix first (it holds the shorter), then the shorter."""
    spec = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=2, head_dim=32, dtype=torch.float32, max_tokens=100)
    page = 4096
    with LocalDaemon(host_pool_gb=128 / (1 << 20), device_pool_gb=1 / 64, extra_args=["--page-kb", "4"]) as d:
        with KVRecallClient(d.target, "chain-worker") as client:
            ids = list(range(40))
            with client.open_session(spec, "full", prefix=declare(ids[:30], FINGERPRINT)) as a:
                a.ingest(random_kv(spec, 30, seed=1))
            with client.open_session(spec, "full", prefix=declare(ids, FINGERPRINT)) as b:
                assert b.prefix_held == 30
                send_chunk(b, random_kv(spec, 10, seed=2))
                held = {p.tokens: (p.host_bytes, p.refs) for p in client.stats().prefixes}
                assert held == {30: (8 * page, 1), 40: (3 * page, 1)}
                host = next(p for p in client.stats().pools if p.tier == "host")
                assert host.used_bytes == (8 + 3 + 25 - 10) * page  # both prefixes and b's own pages
            assert {p.tokens: p.refs for p in client.stats().prefixes} == {30: 1, 40: 0}
            with client.open_session(spec, "full") as big:  # 25 pages: both cached prefixes go
                stats = client.stats()
                assert stats.prefix_evictions == 2 and stats.prefixes == []
                host = next(p for p in stats.pools if p.tier == "host")
                assert host.used_bytes == 25 * page
                big.ingest(random_kv(spec, 30, seed=3))


def test_stream_of_a_held_prefix_session_is_a_chunk_or_decode(daemon):
    """A session over a held prefix refuses IngestPrompt (it has its prompt) and appends from the prefix's end."""
    policy, config = POLICIES[0]
    with KVRecallClient(daemon.target, "prefix-append") as client:
        with open_on(client, policy, config) as first:
            ingest(first)
            with open_on(client, policy, config) as second:
                with pytest.raises(FailedPreconditionError, match="already ingested"):
                    ingest(second)
                for _ in range(second.spill_every):
                    second.write_token(second.position, torch.zeros(2, 2, 16), torch.zeros(2, 2, 16))
                    second.advance()
                assert second.stats().tokens == DOC + second.spill_every
