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


@pytest.fixture
def unit_reps(request, monkeypatch):
    """The daemon's unit_reps_dtype for the tables the test makes ("layout" unless parametrized)."""
    from kvrecall.server.policies import louiskv

    monkeypatch.setattr(louiskv, "_fp8_reps", False)  # (restored after the test)
    reps_dtype = getattr(request, "param", "layout")
    louiskv.configure(False, reps_dtype)
    return reps_dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", ["max", "sum"])
@pytest.mark.parametrize("tokens,units,open_tokens", [(900, 60, 48), (300, 20, 0), (500, 31, 16), (120, 9, 64)])
@pytest.mark.parametrize("budget,pin_ingest", [(64, 0.0), (256, 0.25), (1400, 0.25)])
@pytest.mark.parametrize("unit_reps", ["layout", "fp8"], indirect=True)
def test_the_workers_choice_is_the_daemons(device, aggregate, tokens, units, open_tokens, budget, pin_ingest,
                                           unit_reps):  # fmt: skip
    """(unit_reps fp8: a table stored in float8 e4m3; the worker's open unit rounds as the daemon's close does.)"""
    policy = session_like(device, tokens, units, open_tokens, budget, pin_ingest, aggregate)
    assert policy.units.reps.dtype == (torch.float8_e4m3fn if unit_reps == "fp8" else torch.float32)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("open_tokens", [0, 16])
def test_a_riding_notices_evictions_join_the_open_segment(device, open_tokens):
    """A notice riding in the retrieval's event evicts 20 more tokens, applied by the daemon before
    it would choose: their keys (ring slices: two, as where the ring wraps) join the worker's open
    segment as the notice adds them to the daemon's. Over a closed segment (no open tokens) the
    mapped sum is stale and must not be read. The query points along the evicted keys, so the
    open segment is the unit the choice takes first."""
    policy = session_like(device, 300, 20, open_tokens, 64, 0.0, "max")
    worker, state = worker_view(policy, open_tokens)
    g = torch.Generator().manual_seed(5)
    keys = (torch.randn(L, H, 20, D, generator=g) + 4 * torch.randn(D, generator=g)).to(device)
    if not open_tokens:
        worker.open_sum.copy_(-1000 * keys.sum(dim=2).view(L * H, D))  # a closed segment's sum, stale
    query = (3 * keys.mean(dim=2)).repeat_interleave(G, dim=1)  # [L, H * G, D]
    end = state.evicted + 20
    worker.choose(query, state, (end, [keys[:, :, :7], keys[:, :, 7:]]))
    # the daemon: the notice's keys join the open segment, the boundary closes it, then chooses
    policy._add_to_open(keys[:, :, :7])
    policy._add_to_open(keys[:, :, 7:])
    close_segments([(policy, end)])
    assert policy.units.sizes[:, 20].eq(open_tokens + 20).all()
    new, _ = choose_units_split(query.reshape(L * H, G, D), policy.units.segments(), None, 64, "max")
    assert as_sets(worker.chosen) == as_sets(new)
    assert all(set(range(300 + open_tokens, 320 + open_tokens)) <= row for row in as_sets(new)), "the open unit taken"


@pytest.mark.parametrize("evicted,position", [(100, 130), (120, 150), (140, 150)])
def test_riding_eviction_reads_the_tokens_a_notice_evicts_from_the_ring(evicted, position):
    """The engine's view of a riding notice (engine.riding_eviction): the daemon's rule (up to
    position - min_window) and the ring slots of those tokens in position order, across a wrap."""
    from types import SimpleNamespace

    from kvrecall.engine.engine import riding_eviction

    n_sink, retrieved, window, min_window = 4, 8, 32, 16
    keys = torch.full((1, 1, n_sink + retrieved + window, 1), -1.0)
    for p in range(position - window, position):  # the ring holds the last `window` positions
        keys[0, 0, n_sink + retrieved + p % window, 0] = p
    core = SimpleNamespace(position=position, min_window=min_window, n_sink=n_sink, retrieved=retrieved,
                           window=window, keys=keys)  # fmt: skip
    end, slices = riding_eviction(core, pb.MappedTableState(evicted=evicted))
    assert end == max(evicted, position - min_window)
    got = torch.cat(slices, dim=2).flatten().tolist() if slices else []
    assert got == list(range(evicted, end))
