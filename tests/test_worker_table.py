"""The worker's choice over its mapped unit table (kvrecall/client/selection.py, the daemon's
worker_selection) against the daemon's at a boundary (louiskv: the open output segment closed
into the table, then choose_units over every unit): the same positions per row as sets and the
same number of units, at several sizes, with and without pinned tokens, with an open segment
that holds tokens or none, a table with no room left, both aggregates; on the GPU kernels too
(marked gpu). The worker never writes the table; the daemon's close after its choice makes the
table the daemon's."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client.selection import WorkerTable
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy, choose_units_split, close_segments
from kvrecall.server.policies.snapkv import ascending
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.test_split_selection import grow

L, H, G, D = 2, 2, 3, 16
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]  # fmt: skip


def session_like(device: str, tokens: int, units: int, open_tokens: int, budget: int, pin_ingest: float,
                 aggregate: str, max_tokens: int = 8000) -> LouisKVPolicy:  # fmt: skip
    """A policy whose table holds `units` clusters of `tokens` candidates, an open segment of
    `open_tokens` evicted tokens after them (their keys summed) and, with pin_ingest, pinned tokens."""
    layout = ModelLayout(L, H, H * G, D, torch.float32, max_tokens=max_tokens)
    policy = LouisKVPolicy(LouisKVConfig(budget=budget, pin_ingest=pin_ingest, aggregate=aggregate), layout)
    policy._table(torch.device(device))
    grow(policy.units, tokens, units, seed=tokens + units)
    policy.open_start = policy.closed_upto = tokens
    if open_tokens:
        g = torch.Generator().manual_seed(open_tokens)
        policy.open_sum = (torch.randn(L * H, D, generator=g) * open_tokens).to(device)
    P = policy.config.pinned_tokens
    if P:
        g = torch.Generator().manual_seed(7)
        rows = torch.stack([torch.randperm(tokens, generator=g)[:P] for _ in range(L * H)])
        policy.pinned = ascending(rows).to(device)
    return policy


def worker_view(policy: LouisKVPolicy, open_tokens: int) -> tuple[WorkerTable, pb.MappedTableState]:
    """What a worker maps of this policy's table (its fields as they are), and its state."""
    table, B = policy.units, L * H
    device = table.reps.device
    open_sum = policy.open_sum if policy.open_sum is not None else torch.zeros(B, D, device=device)
    worker = WorkerTable(
        table.reps, table.sizes, table.position, policy.pinned, open_sum.clone(),
        torch.full((B, policy.config.budget), -1, dtype=torch.int64, device=device),
        torch.zeros(4, dtype=torch.int64, device=device), policy.config.aggregate,
    )  # fmt: skip
    state = pb.MappedTableState(units=table.num_units, candidates=table.num_tokens, open_start=policy.open_start,
                                evicted=policy.open_start + open_tokens)  # fmt: skip
    return worker, state


def as_sets(positions: torch.Tensor) -> list[set[int]]:
    return [set(row[row >= 0].tolist()) for row in positions.view(L * H, -1).cpu()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", ["max", "sum"])
@pytest.mark.parametrize("tokens,units,open_tokens", [(900, 60, 48), (300, 20, 0), (500, 31, 16), (120, 9, 64)])
@pytest.mark.parametrize("budget,pin_ingest", [(64, 0.0), (256, 0.25), (1400, 0.25)])
def test_the_workers_choice_is_the_daemons(device, aggregate, tokens, units, open_tokens, budget, pin_ingest):
    policy = session_like(device, tokens, units, open_tokens, budget, pin_ingest, aggregate)
    worker, state = worker_view(policy, open_tokens)
    g = torch.Generator().manual_seed(budget + tokens)
    query = torch.randn(L, H * G, D, generator=g).to(device)
    worker.choose(query, state)
    before = {name: getattr(policy.units, name).clone() for name in ("reps", "sizes", "position")}
    assert all(torch.equal(getattr(policy.units, n), t) for n, t in before.items()), "the worker wrote the table"
    # the daemon: the open segment closes, then every unit is chosen from
    close_segments([(policy, state.evicted)])
    assert policy.units.num_units == units + (1 if open_tokens else 0)
    new, take = choose_units_split(query.reshape(L * H, G, D), policy.units.segments(), policy.pinned, budget,
                                   aggregate)  # fmt: skip
    assert as_sets(worker.chosen) == as_sets(new)
    assert worker.chosen_meta.tolist() == [int((take > 0).sum()), units, tokens, tokens]
    if open_tokens and budget == 64:  # the open segment is a unit the choice may take: it was offered
        assert policy.units.sizes[:, units].eq(open_tokens).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a_full_table_offers_no_open_unit_as_the_daemon_closes_none(device):
    """A table with no room: the daemon leaves the segment open (close_segments), and the worker
    offers it as no unit either."""
    policy = session_like(device, 40, 3, 16, 64, 0.0, "max", max_tokens=40)  # units capacity: 40 // 16 + 2 = 4
    policy.units.advance(policy.units.room, 0)  # (the rest of the columns: filled, empty units)
    worker, state = worker_view(policy, 16)
    query = torch.randn(L, H * G, D, generator=torch.Generator().manual_seed(1)).to(device)
    worker.choose(query, state)
    close_segments([(policy, state.evicted)])
    assert policy.open_start == 40, "the daemon closed nothing"
    new, _ = choose_units_split(query.reshape(L * H, G, D), policy.units.segments(), None, 64, "max")
    assert as_sets(worker.chosen) == as_sets(new)
