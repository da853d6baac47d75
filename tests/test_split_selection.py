"""louiskv over a shared prefix: a session's unit table is the prefix's table (its base, read-only)
and its own columns after it. A retrieval reads them apart (choose_units_split: each part scored
and expanded alone, only [rows, units] scores and sizes joined) instead of concatenating the
prefix's table at every retrieval; it must choose exactly what one concatenated table chooses,
with and without pinned tokens, for a chain of prefixes, an empty own part, and a subset of
layers. On a CUDA machine the same checks run on the GPU kernels (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import (
    UNIT_FIELDS,
    LouisKVConfig,
    LouisKVPolicy,
    choose_units,
    choose_units_split,
    cluster_pieces,
)
from kvrecall.server.policies.snapkv import ascending

L, H, G, D = 2, 2, 3, 16

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]  # fmt: skip


def grow(table, tokens: int, units: int, seed: int) -> None:
    """`tokens` more candidates in `units` more clusters per row (an ingest's or a chunk's)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L * H, tokens, D, generator=g).to(table.reps.device)
    table.put(slice(None), *cluster_pieces(keys, units, 2, table.num_tokens))
    table.advance(units, tokens)


def chained(device: str, growth: list[tuple[int, int]], budget: int, pin_ingest: float) -> LouisKVPolicy:
    """A policy whose table extends one table per (tokens, units) but the last (a prefix chain)."""
    layout = ModelLayout(L, H, H * G, D, torch.float32, max_tokens=8000)
    policy = LouisKVPolicy(LouisKVConfig(budget=budget, pin_ingest=pin_ingest), layout)
    policy._table(torch.device(device))
    for i, (tokens, units) in enumerate(growth):
        if i:
            policy.units = policy.units.extend()
        if tokens:
            grow(policy.units, tokens, units, seed=i)
    P = policy.config.pinned_tokens
    if P:
        g = torch.Generator().manual_seed(99)
        high = policy.units.num_tokens
        rows = torch.stack([torch.randperm(high, generator=g)[:P] for _ in range(L * H)])
        policy.pinned = ascending(rows).to(device)
    return policy


def joined(policy: LouisKVPolicy, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """choose_units over the concatenated fields (what a retrieval over a prefix read before)."""
    fields = [policy.units.view(name) for name in UNIT_FIELDS]
    return choose_units(q, *fields, policy.pinned, policy.config.budget, policy.config.aggregate)


# a prefix then the session's own columns; a chain of three; an own part with nothing yet
CHAINS = [[(900, 60), (300, 20)], [(500, 30), (400, 25), (120, 9)], [(700, 50), (0, 0)]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("budget,pin_ingest", [(64, 0.0), (256, 0.25), (1400, 0.25), (4096, 0.0)])
def test_split_selection_chooses_what_one_table_does(device, chain, budget, pin_ingest):
    policy = chained(device, chain, budget, pin_ingest)
    assert len(policy.units.segments()) == len(chain)
    for seed in range(3):
        q = torch.randn(L * H, G, D, generator=torch.Generator().manual_seed(10 + seed)).to(device)
        new, take = choose_units_split(q, policy.units.segments(), policy.pinned, budget, policy.config.aggregate)
        want_new, want_take = joined(policy, q)
        assert torch.equal(new, want_new)
        assert torch.equal(take.long(), want_take.long())
        if budget >= policy.units.num_tokens:  # every unit fits (1400: not beside the pinned): all, once
            assert int((new >= 0).sum()) == L * H * policy.units.num_tokens


@pytest.mark.parametrize("device", DEVICES)
def test_a_subset_of_layers_over_a_prefix_scores_only_its_rows(device):
    """_select for some layers over a chained table: those rows as one table gives them, the others kept."""
    policy = chained(device, CHAINS[1], 128, 0.25)
    q = torch.randn(L, H * G, D, generator=torch.Generator().manual_seed(5)).to(device)
    want, _ = joined(policy, q.reshape(L * H, G, D))

    class Ctx:  # what _select reads of a session: its working set's retrieved positions
        class ws:
            @staticmethod
            def retrieved_positions():
                return torch.full((L, H, 128), -7, dtype=torch.int64, device=device)

    selection = policy._select(Ctx, q, [1])
    assert torch.equal(selection.positions[1], want.view(L, H, -1)[1])
    assert bool((selection.positions[0] == -7).all())


def test_segments_are_views_of_the_tables():
    """No copy: each segment's fields share storage with its table's tensors."""
    policy = chained("cpu", CHAINS[1], 64, 0.0)
    tables = [policy.units.base.base, policy.units.base, policy.units]
    for table, segment in zip(tables, policy.units.segments(), strict=True):
        for name, field in zip(UNIT_FIELDS, segment, strict=True):
            assert field.untyped_storage().data_ptr() == getattr(table, name).untyped_storage().data_ptr()
        assert segment[0].shape[1] == table.own_units and segment[3].shape[1] == table.own_tokens
