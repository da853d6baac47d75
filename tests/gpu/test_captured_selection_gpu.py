"""louiskv's boundary selection replayed as a CUDA graph (kvrecall/captured.py) on a GPU: every
replay chooses what the eager kernels choose over the filled columns, through table growth
(re-captures at bucket edges), new pinned tokens and new queries, on the Triton kernels and at
the Llama-3-8B table shape; a re-capture after the session's earlier graph is gone (a pool shared
by every graph failed there: PyTorch releases it with its last graph); two sessions' replays
interleaved keep their own answers."""

from __future__ import annotations

import pytest
import torch

from kvrecall import captured
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import (
    UNIT_FIELDS,
    LouisKVConfig,
    LouisKVPolicy,
    choose_units,
    cluster_pieces,
)
from kvrecall.server.policies.snapkv import ascending

pytestmark = pytest.mark.gpu


@pytest.fixture
def capture_on():
    captured.configure(True)
    yield
    captured.configure(False)


def make_policy(layers, heads, group, dim, budget, pin_ingest, dtype, max_tokens) -> LouisKVPolicy:
    layout = ModelLayout(layers, heads, heads * group, dim, dtype, max_tokens=max_tokens)
    policy = LouisKVPolicy(LouisKVConfig(budget=budget, pin_ingest=pin_ingest), layout)
    policy._table(torch.device("cuda"))
    return policy


def grow(policy: LouisKVPolicy, tokens: int, units: int, seed: int) -> None:
    table = policy.units
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(table.reps.shape[0], tokens, table.reps.shape[2], generator=g, device="cuda")
    table.put(slice(None), *cluster_pieces(keys, units, 2, table.num_tokens))
    table.advance(units, tokens)


def pin(policy: LouisKVPolicy, seed: int) -> None:
    P, rows, high = policy.config.pinned_tokens, policy.units.reps.shape[0], policy.units.num_tokens
    g = torch.Generator(device="cuda").manual_seed(seed)
    policy.pinned = ascending(torch.rand(rows, high, generator=g, device="cuda").argsort(dim=1)[:, :P])


def eager(policy: LouisKVPolicy, q: torch.Tensor) -> torch.Tensor:
    table = policy.units
    new, _ = choose_units(
        q,
        *(table.view(name) for name in UNIT_FIELDS),
        policy.pinned,
        policy.config.budget,
        policy.config.aggregate,
    )
    return new


def query(policy: LouisKVPolicy, seed: int) -> torch.Tensor:
    rows, dim = policy.units.reps.shape[0], policy.units.reps.shape[2]
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(rows, policy.layout.group_size, dim, generator=g, device="cuda").to(
        policy.layout.dtype
    )


@pytest.mark.parametrize(
    "layers,heads,group,dim,budget,pin_ingest,dtype,growth",
    [
        (2, 2, 3, 16, 256, 0.25, torch.float32, [(700, 40), (300, 20), (24, 4), (1100, 70)]),
        (4, 2, 4, 64, 4096, 0.25, torch.bfloat16, [(3000, 190), (64, 1), (2000, 125)]),
        (32, 8, 4, 128, 1024, 0.25, torch.bfloat16, [(8192, 512), (64, 1), (64, 1)]),  # Llama-3-8B rows
        (2, 2, 3, 16, 128, 0.0, torch.float32, [(500, 30), (600, 40)]),  # nothing pinned
    ],
)
def test_replays_choose_what_the_kernels_choose(
    capture_on, layers, heads, group, dim, budget, pin_ingest, dtype, growth
):
    total = sum(tokens for tokens, _ in growth)
    policy = make_policy(layers, heads, group, dim, budget, pin_ingest, dtype, max_tokens=total + 4096)
    before = dict(captured.STATS)
    calls = 0
    for step, (tokens, units) in enumerate(growth):
        grow(policy, tokens, units, seed=step)
        if policy.config.pinned_tokens:
            pin(policy, seed=100 + step)
        for trial in range(3):  # the first call of a new bucket runs eagerly and captures
            q = query(policy, seed=1000 * step + trial)
            got = policy._choose_captured(q)
            calls += 1
            torch.testing.assert_close(got.positions, eager(policy, q).view_as(got.positions), rtol=0, atol=0)
    assert captured.STATS["failures"] == before.get("failures", 0)
    replays = captured.STATS["replays"] - before.get("replays", 0)
    captures = captured.STATS["captures"] - before.get("captures", 0)
    assert captures >= 1 and replays >= calls - captures - 1
    assert captures + replays == calls


def test_two_sessions_replayed_in_turn_keep_their_answers(capture_on):
    """Replays interleaved across sessions: each output is its own."""
    a = make_policy(2, 2, 3, 16, 128, 0.25, torch.float32, 4000)
    b = make_policy(2, 2, 3, 16, 128, 0.25, torch.float32, 4000)
    grow(a, 900, 60, seed=1)
    grow(b, 1500, 90, seed=2)
    pin(a, seed=3)
    pin(b, seed=4)
    for trial in range(4):
        qa, qb = query(a, seed=10 + trial), query(b, seed=20 + trial)
        ga, gb = a._choose_captured(qa), b._choose_captured(qb)
        torch.testing.assert_close(ga.positions, eager(a, qa).view_as(ga.positions), rtol=0, atol=0)
        torch.testing.assert_close(gb.positions, eager(b, qb).view_as(gb.positions), rtol=0, atol=0)
    assert a._captured.graph is not None and b._captured.graph is not None


def test_a_session_opened_after_another_closed_still_captures(capture_on):
    for seed in range(3):  # each policy (and its graphs) dropped before the next one captures
        policy = make_policy(2, 2, 3, 16, 128, 0.25, torch.float32, 4000)
        grow(policy, 900, 60, seed=seed)
        pin(policy, seed=seed)
        for trial in range(2):
            q = query(policy, seed=trial)
            got = policy._choose_captured(q)
            torch.testing.assert_close(got.positions, eager(policy, q).view_as(got.positions), rtol=0, atol=0)
        assert policy._captured.graph is not None and not policy._captured.broken
        del policy
