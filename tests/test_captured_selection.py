"""louiskv's captured selection path (kvrecall/captured.py) on the CPU: reading the unit table in
whole buckets (what a captured graph reads) chooses exactly what the filled columns choose, as
the table grows across buckets, with and without pinned tokens. On a CPU the call runs eagerly;
tests/gpu/test_captured_selection_gpu.py checks the replayed graph against it."""

from __future__ import annotations

import copy

import pytest
import torch

from kvrecall import captured
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import (
    UNIT_FIELDS,
    LouisKVConfig,
    LouisKVPolicy,
    bucket_widths,
    choose_units,
    cluster_pieces,
)
from kvrecall.server.policies.snapkv import ascending

L, H, G, D = 2, 2, 3, 16


def make_policy(budget: int, pin_ingest: float, device: str = "cpu", max_tokens: int = 6000) -> LouisKVPolicy:
    layout = ModelLayout(L, H, H * G, D, torch.float32, max_tokens=max_tokens)
    policy = LouisKVPolicy(LouisKVConfig(budget=budget, pin_ingest=pin_ingest), layout)
    policy._table(torch.device(device))
    return policy


def grow(policy: LouisKVPolicy, tokens: int, units: int, seed: int) -> None:
    """`tokens` more candidates in `units` more clusters per row (what an ingest or a chunk adds)."""
    table = policy.units
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L * H, tokens, D, generator=g).to(table.reps.device)
    table.put(slice(None), *cluster_pieces(keys, units, 2, table.num_tokens))
    table.advance(units, tokens)


def pin(policy: LouisKVPolicy, seed: int) -> None:
    P = policy.config.pinned_tokens
    g = torch.Generator().manual_seed(seed)
    high = policy.units.num_tokens
    rows = torch.stack([torch.randperm(high, generator=g)[:P] for _ in range(L * H)])
    policy.pinned = ascending(rows).to(policy.units.reps.device)


def eager(policy: LouisKVPolicy, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """choose_units over exactly the filled columns (the selection before capture existed)."""
    table = policy.units
    new, take = choose_units(
        q,
        *(table.view(name) for name in UNIT_FIELDS),
        policy.pinned,
        policy.config.budget,
        policy.config.aggregate,
    )
    return new.view(L, H, -1), int((take > 0).sum())


# (tokens, units) added before each boundary: inside one bucket, onto a bucket's edge, across it
GROWTH = [(700, 40), (300, 20), (24, 4), (1, 1), (1100, 70), (900, 60)]


@pytest.mark.parametrize("budget,pin_ingest", [(64, 0.0), (256, 0.25), (4096, 0.25)])
def test_bucketed_columns_choose_what_the_filled_ones_do(budget, pin_ingest):
    policy = make_policy(budget, pin_ingest)
    for step, (tokens, units) in enumerate(GROWTH):
        grow(policy, tokens, units, seed=step)
        if policy.config.pinned_tokens:
            pin(policy, seed=100 + step)
        widths = bucket_widths(policy.units)
        assert widths[0] >= policy.units.num_units and widths[1] >= policy.units.num_tokens
        for trial in range(2):
            q = torch.randn(L * H, G, D, generator=torch.Generator().manual_seed(1000 * step + trial))
            selection = policy._choose_captured(q)
            expected, units = eager(policy, q)
            assert torch.equal(selection.positions, expected), f"step {step}: widths {widths}"
            assert int(selection.units) == units


def test_bucket_widths_round_up_and_stop_at_capacity():
    policy = make_policy(64, 0.0, max_tokens=1500)
    table = policy.units
    assert bucket_widths(table) == (0, 0)
    grow(policy, 700, 40, seed=0)
    assert bucket_widths(table) == (64, 1024)
    grow(policy, 324, 24, seed=1)
    assert bucket_widths(table) == (64, 1024)  # exactly full buckets
    grow(policy, 1, 1, seed=2)
    capacity = (table.sizes.shape[1], table.position.shape[1])
    assert capacity[0] < 128 and capacity[1] < 2048  # 1500 tokens: below two buckets of each
    assert bucket_widths(table) == capacity


@pytest.mark.parametrize("pin_ingest", [0.0, 0.25])
def test_unfilled_candidates_are_never_chosen(pin_ingest):
    """Columns past the filled ones belong to no unit: the unfilled units have size 0 (and are
    invalid) and the filled ones' sizes add up to the filled candidates, so the grouped
    expansion never reaches them, whatever they hold, even with a budget over every unit."""
    policy = make_policy(4096, pin_ingest)
    grow(policy, 100, 10, seed=0)
    if policy.config.pinned_tokens:
        pin(policy, seed=1)
    table = policy.units
    assert bool((table.sizes[:, 10:] == 0).all()) and not bool(table.valid[:, 10:].any())
    assert bool((table.sizes[:, :10].sum(dim=1) == 100).all())
    table.position[:, 100:] = 10**6  # a position no row holds: chosen, it would show
    q = torch.randn(L * H, G, D, generator=torch.Generator().manual_seed(2))
    positions = policy._choose_captured(q).positions  # reads whole buckets: 1024 candidate columns
    for row in positions.view(L * H, -1):
        assert sorted(row[row >= 0].tolist()) == list(range(100))  # every filled token once, nothing else


def test_a_policy_copy_starts_without_the_graph():
    policy = make_policy(64, 0.0)
    grow(policy, 100, 10, seed=0)
    policy._captured.key = ("shape",)
    clone = copy.deepcopy(policy)
    assert clone._captured is not policy._captured and clone._captured.key is None


def test_capture_is_off_on_a_cpu_and_by_default():
    assert not captured.enabled(torch.device("cpu"))
    captured.configure(True)
    try:
        assert not captured.enabled(torch.device("cpu"))
        assert captured.enabled(torch.device("cuda"))
    finally:
        captured.configure(False)
    assert not captured.enabled(torch.device("cuda"))
