"""louiskv's first retrieval at ingest, and a chunk's: single tokens by the observation queries' attention
("tokens", the default) or whole clusters ("units"); both through a real daemon."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import InvalidArgumentError
from tests.conftest import SMALL, random_kv

PROMPT, NEEDLE = 300, 137


def needle_prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt KV whose token NEEDLE's key is what every observation query looks for."""
    kv = random_kv(SMALL, PROMPT, seed=3) * 0.1
    direction = torch.zeros(SMALL.head_dim)
    direction[0] = 1.0
    kv[:, 0, :, NEEDLE] = 8.0 * direction
    queries = 4.0 * direction.expand(SMALL.num_layers, SMALL.num_query_heads, 16, -1).clone()
    return kv, queries


@pytest.mark.parametrize("mode", ["tokens", "units"])
def test_the_needle_is_retrieved_at_ingest(client, mode):
    kv, queries = needle_prompt()
    config = {"budget": 16, "n_sink": 4, "window": 32, "cluster_size": 4, "ingest_select": mode}
    with client.open_session(SMALL, "louiskv", config) as session:
        assert session.observation == 16
        session.ingest(kv, queries)
        for layer in range(SMALL.num_layers):
            for head in range(SMALL.num_kv_heads):
                positions = set(session.slot_pos[layer, head].tolist())
                assert NEEDLE in positions, (mode, layer, head)
                slot = session.slot_pos[layer, head].tolist().index(NEEDLE)
                assert torch.equal(session.keys[layer, head, slot], kv[layer, 0, head, NEEDLE])


def test_tokens_mode_takes_the_neighbours_not_a_cluster(client):
    kv, queries = needle_prompt()
    # the max-pooled vote alone (ingest_span 0: no spans around the best votes)
    config = {"budget": 8, "n_sink": 4, "window": 32, "ingest_select": "tokens", "ingest_span": 0}
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, queries)
        retrieved = session.slot_pos[0, 0, 4:12].tolist()
    # max-pooled votes: the needle and its 3 neighbours on each side rank first
    assert set(range(NEEDLE - 3, NEEDLE + 4)) <= set(retrieved)


@pytest.mark.parametrize(
    "field,value",
    [("ingest_select", "clusters"), ("chunk_select", "clusters"), ("observation", 0), ("observation", 999)],
)
def test_bad_ingest_settings_are_refused(client, field, value):
    with pytest.raises(InvalidArgumentError, match=f"policy.louiskv.*{field}|{field}"):
        client.open_session(SMALL, "louiskv", {"budget": 16, "window": 32, field: value})


@pytest.mark.parametrize("pin", [0.0, 0.5])
def test_pinned_ingest_tokens_survive_a_retrieval_elsewhere(client, pin):
    """A boundary whose query looks away from the needle replaces the whole ingest selection,
    unless `pin_ingest` keeps its best tokens (then each token is resident once)."""
    kv, queries = needle_prompt()
    config = {"budget": 16, "n_sink": 4, "window": 32, "cluster_size": 4, "pin_ingest": pin}
    away = torch.zeros(SMALL.head_dim)
    away[1] = 1.0
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, queries)
        assert all(
            NEEDLE in session.slot_pos[layer, h].tolist()
            for layer in range(SMALL.num_layers)
            for h in range(SMALL.num_kv_heads)
        )
        session.query.copy_(4.0 * away.expand_as(session.query))
        session.boundary()
        for layer in range(SMALL.num_layers):
            for head in range(SMALL.num_kv_heads):
                positions = [p for p in session.slot_pos[layer, head].tolist() if p >= 0]
                assert len(positions) == len(set(positions)), (layer, head)
                assert (NEEDLE in positions) == (pin > 0), (pin, layer, head)
                if pin:
                    slot = session.slot_pos[layer, head].tolist().index(NEEDLE)
                    assert torch.equal(session.keys[layer, head, slot], kv[layer, 0, head, NEEDLE])


def test_pin_ingest_out_of_range_is_refused(client):
    with pytest.raises(InvalidArgumentError, match="pin_ingest"):
        client.open_session(SMALL, "louiskv", {"budget": 16, "window": 32, "pin_ingest": 1.5})


DECOY = 60


@pytest.mark.parametrize("mode", ["tokens", "units"])
def test_a_chunks_queries_replace_the_pinned_ingest_tokens(client, mode):
    """A document ingested before its question: the ingest's vote pins the tokens around a
    decoy; the question chunk's queries look for the needle. With chunk_select "tokens" the
    chunk's retrieval takes the needle and pins it, so a later retrieval that looks elsewhere
    keeps it; with "units" the chunk's clusters bring it but the ingest's pin stays, and the
    later retrieval drops it."""
    kv, _ = needle_prompt()
    e = torch.eye(SMALL.head_dim)
    kv[:, 0, :, DECOY] = 8.0 * e[1]
    L, Hq = SMALL.num_layers, SMALL.num_query_heads
    # pin 8 tokens: the max-pooled vote ties the needle with its 3 neighbours on each side
    config = {
        "budget": 16, "n_sink": 4, "window": 32, "cluster_size": 4, "pin_ingest": 0.5, "chunk_select": mode,
        "chunk_span": 0,  # single tokens (spans around the needle would take the 16-token budget)
    }
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, 4.0 * e[1].expand(L, Hq, 16, -1).clone())
        assert NEEDLE not in session.slot_pos.flatten().tolist()
        session.boundary(list(range(L)), queries=4.0 * e[0].expand(L, Hq, 16, -1).clone())
        for layer in range(L):
            for head in range(SMALL.num_kv_heads):
                assert NEEDLE in session.slot_pos[layer, head].tolist(), (mode, layer, head)
        session.query.copy_(4.0 * e[2].expand_as(session.query))
        session.boundary()
        for layer in range(L):
            for head in range(SMALL.num_kv_heads):
                positions = [p for p in session.slot_pos[layer, head].tolist() if p >= 0]
                assert len(positions) == len(set(positions)), (layer, head)
                assert (NEEDLE in positions) == (mode == "tokens"), (mode, layer, head)
                assert (DECOY in positions) == (mode == "units"), (mode, layer, head)


@pytest.mark.parametrize("span", [0, 5])
def test_chunk_span_brings_the_neighbours_of_the_chunks_best_votes(client, span):
    """A chunk's queries look for the needle: the max-pooled vote takes it and its 3 neighbours on
    each side; with chunk_span the best-voted quarter (4 of those 7) brings their 5 neighbours on
    each side, so the row holds at least [needle - 4, needle + 4]."""
    kv, _ = needle_prompt()
    e = torch.eye(SMALL.head_dim)
    L, Hq = SMALL.num_layers, SMALL.num_query_heads
    config = {"budget": 16, "n_sink": 4, "window": 32, "cluster_size": 4, "chunk_span": span}
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, 4.0 * e[1].expand(L, Hq, 16, -1).clone())
        session.boundary(list(range(L)), queries=4.0 * e[0].expand(L, Hq, 16, -1).clone())
        for layer in range(L):
            for head in range(SMALL.num_kv_heads):
                positions = [p for p in session.slot_pos[layer, head, 4:20].tolist() if p >= 0]
                assert len(positions) == len(set(positions)) == 16, (span, layer, head)
                near = set(range(NEEDLE - 4, NEEDLE + 5))
                assert set(range(NEEDLE - 3, NEEDLE + 4)) <= set(positions), (span, layer, head)
                assert (near <= set(positions)) == (span > 0), (span, layer, head)


@pytest.mark.parametrize("span", [0, 5])
def test_ingest_span_brings_the_neighbours_of_the_ingests_best_votes(client, span):
    """The observation queries look for the needle: the max-pooled vote takes it and its 3
    neighbours on each side; with ingest_span the best-voted quarter (4 of the 16-token budget)
    brings their 5 neighbours on each side, so the row holds [needle - 4, needle + 4] whole
    (the question-in-prompt twin of chunk_span), each position once."""
    kv, queries = needle_prompt()
    config = {"budget": 16, "n_sink": 4, "window": 32, "cluster_size": 4, "ingest_span": span}
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, queries)
        for layer in range(SMALL.num_layers):
            for head in range(SMALL.num_kv_heads):
                positions = [p for p in session.slot_pos[layer, head, 4:20].tolist() if p >= 0]
                assert len(positions) == len(set(positions)) == 16, (span, layer, head)
                assert set(range(NEEDLE - 3, NEEDLE + 4)) <= set(positions), (span, layer, head)
                assert (set(range(NEEDLE - 4, NEEDLE + 5)) <= set(positions)) == (span > 0), (span, layer, head)


def test_ingest_span_out_of_range_is_refused(client):
    with pytest.raises(InvalidArgumentError, match="ingest_span"):
        client.open_session(SMALL, "louiskv", {"budget": 16, "window": 32, "ingest_span": 257})


@pytest.mark.parametrize("vote", ["flat", "scales"])
def test_the_scales_vote_favours_the_latest_observation_queries(client, vote):
    """The last 4 of the 16 observation queries look for needle A, the 12 before them for needle
    B, and the 8-token budget holds one needle's max-pooled neighbourhood: the flat vote (12
    queries against 4) keeps B's, the scales vote (the last 4, 8 and 16 queries' mean votes
    summed: 4 x 0.4375 for A against 4 x 0.1875 + 8 x 0.0625 for B) keeps A's (the eighth slot
    goes to the other needle's best token)."""
    a, b = 60, 200
    kv = random_kv(SMALL, PROMPT, seed=5) * 0.1
    queries = torch.zeros(SMALL.num_layers, SMALL.num_query_heads, 16, SMALL.head_dim)
    for needle, axis, looking in ((a, 0, slice(12, 16)), (b, 1, slice(0, 12))):
        kv[:, 0, :, needle] = 0.0
        kv[:, 0, :, needle, axis] = 8.0
        queries[:, :, looking, axis] = 4.0
    config = {"budget": 8, "n_sink": 4, "window": 32, "observation_vote": vote, "ingest_span": 0}  # the vote alone
    with client.open_session(SMALL, "louiskv", config) as session:
        session.ingest(kv, queries)
        for layer in range(SMALL.num_layers):
            for head in range(SMALL.num_kv_heads):
                held = set(session.slot_pos[layer, head, 4:12].tolist())
                kept, lost = (a, b) if vote == "scales" else (b, a)
                assert set(range(kept - 3, kept + 4)) <= held, (vote, layer, head)
                assert len(held & set(range(lost - 3, lost + 4))) <= 1, (vote, layer, head)  # the 8th slot at most


def test_an_unknown_observation_vote_is_refused(client):
    with pytest.raises(InvalidArgumentError, match="observation_vote"):
        client.open_session(SMALL, "louiskv", {"budget": 16, "window": 32, "observation_vote": "recent"})
