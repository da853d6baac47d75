"""Open -> ingest -> decode -> close against a real daemon process over real gRPC."""

from __future__ import annotations

import threading

import pytest
import torch

from kvrecall.client import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from kvrecall.client.core import ModelSpec
from tests.conftest import SMALL, pool_used, random_kv, random_query

POLICIES = [
    ("full", None),
    ("streaming", {"n_sink": 4, "window": 32}),
    ("louiskv", {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8}),
    ("quest", {"budget": 48, "n_sink": 4, "window": 32, "page_size": 8}),
    ("snapkv", {"budget": 48, "n_sink": 4, "window": 32, "observation": 4}),
]


def resident(session, layer: int, head: int) -> dict[int, int]:
    """position -> slot for one (layer, head) of the mapped working set."""
    pos = session.slot_pos[layer, head]
    return {int(p): s for s, p in enumerate(pos.tolist()) if p >= 0}


def check_contents(session, kv: torch.Tensor) -> None:
    """Every resident slot holds exactly the K/V of the token its slot_pos names."""
    L, H = session.spec.num_layers, session.spec.num_kv_heads
    for layer in range(L):
        for head in range(H):
            for position, slot in resident(session, layer, head).items():
                assert torch.equal(session.keys[layer, head, slot], kv[layer, 0, head, position])
                assert torch.equal(session.values[layer, head, slot], kv[layer, 1, head, position])


def decode_steps(session, full_kv: torch.Tensor, start: int, steps: int, boundary_every: int = 0) -> int:
    """Write tokens [start, start + steps) of full_kv as a worker would; returns boundaries sent."""
    sent = 0
    for position in range(start, start + steps):
        session.write_token(position, full_kv[:, 0, :, position], full_kv[:, 1, :, position])
        session.advance()
        if boundary_every and (position + 1) % boundary_every == 0:
            session.query.copy_(torch.randn_like(session.query))
            session.boundary()
            sent += 1
    return sent


@pytest.mark.parametrize("transport", ["shm", "inline"])
@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_lifecycle_keeps_the_right_tokens(client, policy, config, transport):
    before = pool_used(client)
    total = 300
    kv = random_kv(SMALL, total, seed=1)
    prompt = 200
    with client.open_session(SMALL, policy, config, transport=transport) as session:
        session.ingest(kv[:, :, :, :prompt].contiguous(), random_query(SMALL, 2, max(1, session.observation)))
        check_contents(session, kv)
        decode_steps(session, kv, prompt, total - prompt, boundary_every=20)
        session.flush()
        check_contents(session, kv)
        stats = session.stats()
        assert stats.tokens == total
        assert stats.host_tokens == total
        if policy == "full":
            assert set(resident(session, 0, 0)) == set(range(total))
        if policy == "streaming":
            window = set(resident(session, 1, 1)) - set(range(4))
            assert set(resident(session, 1, 1)) >= set(range(4))
            assert len(window) >= 32 - session.spill_every
            assert window == set(range(total - len(window), total))
        if policy in ("louiskv", "quest", "snapkv"):
            assert stats.max_resident_tokens <= 4 + 48 + 32
    assert pool_used(client) == before


def test_streaming_keeps_exactly_sinks_and_window(client):
    spec = SMALL
    kv = random_kv(spec, 400, seed=3)
    with client.open_session(spec, "streaming", {"n_sink": 8, "window": 64}) as session:
        session.ingest(kv[:, :, :, :100].contiguous())
        A = session.spill_every
        expected_window = set(range(100 - (64 - A), 100))
        for layer in range(spec.num_layers):
            for head in range(spec.num_kv_heads):
                assert set(resident(session, layer, head)) == set(range(8)) | expected_window
        decode_steps(session, kv, 100, 3 * A)  # three notices: the ring is back to 64 - A tokens
        for layer in range(spec.num_layers):
            assert set(resident(session, layer, 0)) == set(range(8)) | set(range(100 + 3 * A - (64 - A), 100 + 3 * A))
        check_contents(session, kv)


def test_large_budget_louiskv_holds_every_token(client):
    kv = random_kv(SMALL, 300, seed=4)
    with client.open_session(SMALL, "louiskv", {"budget": 512, "n_sink": 4, "window": 32}) as session:
        session.ingest(kv[:, :, :, :250].contiguous(), random_query(SMALL, 5))
        assert set(resident(session, 0, 1)) == set(range(250))
        decode_steps(session, kv, 250, 40, boundary_every=7)
        session.flush()
        for layer in range(SMALL.num_layers):
            for head in range(SMALL.num_kv_heads):
                assert set(resident(session, layer, head)) == set(range(290))
        check_contents(session, kv)


def test_boundary_retrieves_the_units_the_query_points_at(client):
    """A query aligned with one planted cluster of keys retrieves that cluster."""
    spec = ModelSpec(1, 1, 1, 16, torch.float32, 512)
    kv = random_kv(spec, 400, seed=6) * 0.1
    direction = torch.randn(16, generator=torch.Generator().manual_seed(7))  # seeded: the ingest's
    # max-pooled vote may take a planted token next to a high-scoring random one for other directions
    direction /= direction.norm()
    planted = list(range(120, 136))
    kv[0, 0, 0, planted] = direction * 5 + torch.randn(16, 16) * 0.01
    with client.open_session(spec, "louiskv", {"budget": 32, "n_sink": 4, "window": 32, "cluster_size": 8}) as session:
        session.ingest(kv.contiguous(), -direction.view(1, 1, 1, 16))  # points away at ingest
        assert not set(planted) & set(resident(session, 0, 0))
        session.query.copy_(direction.view(1, 1, 16))
        result = session.boundary()
        assert set(planted) <= set(resident(session, 0, 0))
        assert result.tokens_gathered >= len(planted)
        assert result.bytes_moved == 2 * result.tokens_gathered * 16 * 4
        check_contents(session, kv)


def test_concurrent_sessions_never_see_each_other(client):
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            kv = random_kv(SMALL, 260, seed=seed)
            with client.open_session(SMALL, "louiskv", {"budget": 64, "n_sink": 4, "window": 32}) as session:
                session.ingest(kv[:, :, :, :200].contiguous(), random_query(SMALL, seed))
                decode_steps(session, kv, 200, 60, boundary_every=5)
                check_contents(session, kv)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (11, 12, 13)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_full_pool_is_an_answer_and_older_sessions_are_untouched(client):
    huge = ModelSpec(8, 8, 8, 128, torch.float32, 200_000)
    kv = random_kv(SMALL, 100, seed=21)
    with client.open_session(SMALL, "full") as older:
        older.ingest(kv)
        with pytest.raises(ResourceExhaustedError) as info:
            client.open_session(huge, "full")
        assert "free" in info.value.details
        check_contents(older, kv)
        assert older.stats().tokens == 100


def test_closed_session_is_gone(client):
    session = client.open_session(SMALL, "full")
    session_id = session.session_id
    session.close()
    with pytest.raises(NotFoundError):
        client.stats(session_id)


def test_bad_policy_config_names_the_field(client):
    with pytest.raises(InvalidArgumentError) as info:
        client.open_session(SMALL, "louiskv", {"window": 8})
    assert "window" in info.value.details
