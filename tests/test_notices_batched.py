"""A Boundaries call's notices together (step_batch.append_together: one spill launch per group
of like sessions, on_evict_many per policy class) leave every session exactly as the same
notices one by one (Session.append): working set, host tier, max_resident, policy state."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server import step_batch
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.base import _REGISTRY
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.session import SessionRegistry
from kvrecall.v1 import kvrecall_pb2 as pb

RESIDENT = {"budget": 24, "n_sink": 4, "window": 32}
CASES = [
    ("louiskv", {**RESIDENT, "cluster_size": 8, "max_segment": 16}, 2),
    ("louiskv", {**RESIDENT, "cluster_size": 8, "max_segment": 32}, 3),  # another layout: its own launch
    ("louiskv", {**RESIDENT, "budget": 400}, 2),  # the budget covers the sequence: evictions fill free slots
    ("quest", {**RESIDENT, "page_size": 8}, 2),
    ("snapkv", dict(RESIDENT), 2),
    ("streaming", {"n_sink": 4, "window": 32}, 2),
    # with the third: one layout and plan, so their fills are placed in one launch (_place_fills)
    ("louiskv", {**RESIDENT, "budget": 400, "max_segment": 16}, 2),
    ("snapkv", {**RESIDENT, "budget": 400}, 2),
]
PROMPT, STEPS = 90, 100


def louiskv_state(policy) -> list[torch.Tensor]:
    if policy.name != "louiskv":
        return []
    table = policy.units
    state = [getattr(table, name) for name in ("reps", "sizes", "valid", "position")]
    return state + ([policy.open_sum] if policy.open_sum is not None else [])


@pytest.fixture
def registry():
    host = HostPool(64 << 20, page_bytes=64 * 1024)
    registry = SessionRegistry(host, DevicePool(256 << 20, torch.device("cpu")), 600.0)
    yield registry
    for session in list(registry.sessions.values()):
        registry.close(session)
    host.close()


def test_notices_together_equal_notices_one_by_one(registry):
    twins = []
    for i, (name, config, layers) in enumerate(CASES):
        layout = ModelLayout(layers, 2, 4, 16, torch.float32, max_tokens=PROMPT + STEPS + 8)
        cls = _REGISTRY[name]
        g = torch.Generator().manual_seed(i)
        kv = torch.randn(layers, 2, 2, PROMPT + STEPS, 16, generator=g)
        query = torch.randn(layers, 4, 16, 16, generator=g)
        pair = []
        for _ in range(2):
            session = registry.open("w", layout, cls(cls.Config(**config), layout), pb.TRANSPORT_SHM, 600.0, name)
            session.ingest(0, kv[:, :, :, :PROMPT], query)
            pair.append(session)
        twins.append((*pair, kv))
    every = twins[0][0].plan.spill_every
    for upto in range(PROMPT + every, PROMPT + STEPS, every):
        for a, b, kv in twins:
            for session in (a, b):  # the worker's writes into the ring
                ws = session.ws
                for position in range(session.spilled_upto, upto):
                    slot = ws.plan.window_start + position % ws.plan.window
                    ws.keys[:, :, slot] = kv[:, 0, :, position]
                    ws.values[:, :, slot] = kv[:, 1, :, position]
                    ws.slot_pos[:, :, slot] = position
        together = [a for a, _, _ in twins]
        alone = [b for _, b, _ in twins]
        events = [pb.StepEvent(position=upto, notice=True) for _ in twins]
        got, _ = step_batch.serve_step(together, events)
        want, _ = step_batch.serve_step(alone, events, batch_notices=False)
        assert [o.append for o in got] == [o.append for o in want]
        for a, b, _ in twins:
            assert torch.equal(a.ws.slot_pos, b.ws.slot_pos), a.policy.name
            assert torch.equal(a.ws.keys, b.ws.keys) and torch.equal(a.ws.values, b.ws.values)
            assert a.ws.max_resident == b.ws.max_resident
            assert a.evicted_upto == b.evicted_upto and a.store.num_tokens == b.store.num_tokens == upto
            for layer in range(a.layout.num_layers):
                assert torch.equal(a.store.keys(layer, 0, upto), b.store.keys(layer, 0, upto))
            for x, y in zip(louiskv_state(a.policy), louiskv_state(b.policy), strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5)
            assert a.counters.appends == b.counters.appends
        covering = twins[2][0].ws  # every token stays resident: evictions were placed in free slots
        assert int((covering.slot_pos >= 0).sum(dim=-1).min()) == upto
    segments = twins[0][0].policy.seg_bounds
    assert len(segments) >= 2 and segments == twins[0][1].policy.seg_bounds  # segments closed on the way


@pytest.mark.parametrize("stack_bytes, table_bytes", [(0, 0), (1 << 40, 0), (0, 1 << 30)])
def test_retrievals_stacked_or_one_by_one_equal_each_alone(registry, monkeypatch, stack_bytes, table_bytes):
    """louiskv's select_together: tables stacked (under STACK_MAX_BYTES in all, or small each:
    STACK_TABLE_BYTES) or chosen one session at a time on views give each session the working
    set a retrieval of its own gives."""
    from kvrecall.server.policies import louiskv

    monkeypatch.setattr(louiskv, "STACK_MAX_BYTES", stack_bytes)
    monkeypatch.setattr(louiskv, "STACK_TABLE_BYTES", table_bytes)
    layers, config = 2, {**RESIDENT, "cluster_size": 8, "max_segment": 16}
    layout = ModelLayout(layers, 2, 4, 16, torch.float32, max_tokens=PROMPT + STEPS + 8)
    cls = _REGISTRY["louiskv"]
    together, alone, kvs = [], [], []
    for i, prompt in enumerate((PROMPT, PROMPT - 30, PROMPT + 5)):  # tables of different widths
        g = torch.Generator().manual_seed(40 + i)
        kv = torch.randn(layers, 2, 2, prompt, 16, generator=g)
        query = torch.randn(layers, 4, 16, 16, generator=g)
        for group in (together, alone):
            session = registry.open("w", layout, cls(cls.Config(**config), layout), pb.TRANSPORT_SHM, 600.0, "louiskv")
            session.ingest(0, kv, query)
            group.append(session)
        kvs.append(kv)
    assert louiskv.stacks([s.policy.units.filled_nbytes for s in together]) == (stack_bytes > 0 or table_bytes > 0)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        for a, b in zip(together, alone, strict=True):
            q = torch.randn(a.ws.query.shape, generator=g)
            a.ws.query.copy_(q)
            b.ws.query.copy_(q)
        events = [pb.StepEvent(position=s.spilled_upto, retrieve=True) for s in together]
        step_batch.serve_step(together, events)
        for session, event in zip(alone, events, strict=True):
            step_batch.serve_step([session], [event])
        for a, b in zip(together, alone, strict=True):
            assert torch.equal(a.ws.slot_pos, b.ws.slot_pos)
            assert torch.equal(a.ws.keys, b.ws.keys) and torch.equal(a.ws.values, b.ws.values)


def test_fill_free_slots_many_equals_one_by_one(registry):
    """fill_free_slots_many: the selections fill_free_slots gives each session alone, for
    sessions of one plan with different spans and different numbers of free slots (padded
    to the longest span), one of another plan (alone in its group) and one whose rows are
    full (None)."""
    from kvrecall.server.policies.base import fill_free_slots, fill_free_slots_many

    cls = _REGISTRY["louiskv"]
    items = []
    g = torch.Generator().manual_seed(11)
    spans = [(40, 44), (50, 52), (61, 69), (70, 71), (30, 38)]  # 4, 2, 8, 1, 8 tokens
    for i, (start, end) in enumerate(spans):
        budget = 400 if i < 4 else 300  # the last: another plan
        layout = ModelLayout(2, 2, 4, 16, torch.float32, max_tokens=PROMPT + STEPS + 8)
        session = registry.open("w", layout, cls(cls.Config(**{**RESIDENT, "budget": budget}), layout),
                                pb.TRANSPORT_SHM, 600.0, "louiskv")  # fmt: skip
        session.ingest(0, torch.randn(2, 2, 2, PROMPT, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g))
        ws = session.ws
        s, r = ws.plan.n_sink, ws.plan.retrieved
        region = ws.slot_pos[:, :, s : s + r]
        filled = torch.randint(0, start, region.shape, generator=g, dtype=torch.int32)
        empty = torch.zeros(region.shape, dtype=torch.bool)
        empty[..., :12] = True  # 12 free slots a row, but the least free row has 2 + i (fewer than most spans)
        empty[0, 1, : 12 - (2 + i)] = False
        order = torch.rand(region.shape, generator=g).argsort(dim=-1)
        region.copy_(torch.where(empty.gather(-1, order), -1, filled))
        items.append((session.context(), start, end))
    want = [fill_free_slots(ctx, start, end) for ctx, start, end in items]
    got = fill_free_slots_many(items)
    for w, x in zip(want, got, strict=True):
        assert w is not None and x is not None
        assert torch.equal(w.positions, x.positions)
    assert len({int((x.positions >= 40).sum()) for x in got[:4]}) > 1  # the spans placed different counts
    full = items[0][0].ws
    full.last_placement = type("Counts", (), {"most_filled": full.plan.retrieved})()
    assert fill_free_slots_many(items[:2])[0] is None


def test_louiskv_stacks_many_small_tables_not_large_ones():
    """select_together's rule at its defaults (Llama-3-8B shape: a 4K session's table ~21 MB,
    a 32K one's ~168 MB): never one table; small ones in any number up to 1 GiB in all."""
    from kvrecall.server.policies.louiskv import stacks

    mb = 1 << 20
    assert not stacks([4 * mb]) and stacks([4 * mb, 4 * mb])  # under STACK_MAX_BYTES in all
    assert stacks([21 * mb] * 8) and stacks([21 * mb] * 40)  # 64 sequences at 4K
    assert not stacks([21 * mb] * 60)  # past STACK_TOTAL_BYTES
    assert not stacks([168 * mb] * 2) and not stacks([84 * mb, 84 * mb])  # 32K and 16K sessions: one by one


def test_kernel_part_is_made_once_per_store(registry):
    """WorkingSet.kernel_part: the same views for the same store (made once), the views of the
    working set's own tensors, and the page table of the store it is asked for."""
    cls = _REGISTRY["louiskv"]
    layout = ModelLayout(2, 2, 4, 16, torch.float32, max_tokens=PROMPT + STEPS + 8)
    a, b = (registry.open("w", layout, cls(cls.Config(**RESIDENT), layout), pb.TRANSPORT_SHM, 600.0, "louiskv")
            for _ in range(2))  # fmt: skip
    part = a.ws.kernel_part(a.store)
    assert a.ws.kernel_part(a.store) is part
    slot_pos, keys, values, pages, resident = part
    assert slot_pos.data_ptr() == a.ws.slot_pos.data_ptr() and keys.shape == (4, a.ws.plan.capacity, 16)
    assert values.data_ptr() == a.ws.values.data_ptr() and pages is a.store.page_table
    assert a.ws.kernel_part(b.store)[3] is b.store.page_table  # another store: its own table
