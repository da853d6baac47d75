"""windowkv: window ranking, budget schedules, group sharing and the suffix, through a real daemon."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import InvalidArgumentError
from kvrecall.client.core import ModelSpec
from kvrecall.server.policies.windowkv import layer_budgets, select_windows
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.conftest import pool_used, random_kv, random_query
from tests.integration.test_sessions import check_contents, decode_steps, resident

SPEC = ModelSpec(
    num_layers=4, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512
)
BASE = {"budget": 48, "n_sink": 4, "window": 32, "window_size": 8, "group_size": 2}


# ---- selection, no daemon ---------------------------------------------------------------
def test_window_score_follows_the_task():
    """Localisation ranks a window by its top half, aggregation by its mean."""
    mass = torch.tensor([[1.0, 1, 1, 1, 3, 0, 0, 0, 0.5, 0.5, 0.5, 0.5]])
    assert select_windows(mass, 4, 4, "topmean")[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert select_windows(mass, 4, 4, "mean")[0].nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_windows_are_kept_whole_by_rank():
    torch.manual_seed(0)
    mass = torch.rand(3, 61)  # windows of 8; the last one has 5 tokens
    keep = select_windows(mass, 20, 8, "mean")
    for head in range(3):
        windows = mass[head, :56].view(7, 8).mean(dim=1).tolist() + [mass[head, 56:].mean().item()]
        ranked = sorted(range(8), key=lambda w: -windows[w])
        expected, left = set(), 20
        for w in ranked:
            size = 5 if w == 7 else 8
            if size <= left:
                expected.add(w)
                left -= size
            else:
                left = 0  # the greedy stops at the first window that does not fit whole
        kept = {p // 8 for p in keep[head].nonzero().flatten().tolist()}
        assert kept == expected
        assert int(keep[head].sum()) == sum(5 if w == 7 else 8 for w in expected) <= 20


def test_budget_schedules():
    assert layer_budgets(30, 8, 100, decay=False) == [100] * 30
    for layers, group, budget in [(30, 8, 100), (32, 8, 256), (4, 2, 48), (7, 3, 33)]:
        per_layer = layer_budgets(layers, group, budget, decay=True)
        groups = [per_layer[g : g + group] for g in range(0, layers, group)]
        assert all(len(set(g)) == 1 for g in groups), "one budget per group"
        heads = [g[0] for g in groups]
        assert heads == sorted(heads, reverse=True) and heads[0] > budget > heads[-1]
        assert abs(sum(per_layer) / layers - budget) <= 1.0
        assert heads[-1] == round(budget / 2)
    assert layer_budgets(6, 8, 64, decay=True) == [64] * 6  # a single group cannot decay


# ---- through the daemon -------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,field",
    [
        ({"window_size": 0}, "window_size"),
        ({"group_size": 0}, "group_size"),
        ({"budget_fraction": 1.5}, "budget_fraction"),
        ({"budget_fraction": 0.0}, "budget_fraction"),
        ({"threshold": 2.0}, "threshold"),
        ({"task": 7}, "task"),
        ({"budget": 0}, "budget"),
        ({"window": 8}, "window"),
    ],
)
def test_bad_config_names_the_field(client, config, field):
    with pytest.raises(InvalidArgumentError) as info:
        client.open_session(SPEC, "windowkv", config)
    assert "policy.windowkv" in info.value.details and field in info.value.details


def retrieved(session, layer: int, head: int, prompt: int) -> set[int]:
    """Resident prompt positions outside the sinks and the ring."""
    ring_from = prompt - (session.info.working_set.window - session.spill_every)
    return {p for p in resident(session, layer, head) if 4 <= p < ring_from}


def test_groups_share_positions_and_the_suffix_stays(client):
    before = pool_used(client)
    prompt, total = 200, 260
    kv = random_kv(SPEC, total, seed=7)
    with client.open_session(SPEC, "windowkv", dict(BASE, task="TASK_TYPE_LOCALIZATION")) as session:
        assert session.observation == 32 and session.boundary_mode == pb.BOUNDARY_MODE_NEVER
        session.ingest(kv[:, :, :, :prompt].contiguous(), random_query(SPEC, 8, session.observation))
        check_contents(session, kv)
        ring_from = prompt - (32 - session.spill_every)
        suffix = set(range(prompt - 32, ring_from))  # the suffix part the ring does not hold
        for head in range(SPEC.num_kv_heads):
            for first in (0, 2):
                kept = retrieved(session, first, head, prompt)
                assert kept == retrieved(session, first + 1, head, prompt), "a group shares one selection"
                assert suffix <= kept and len(kept) <= 48
                windows = kept - suffix
                assert len(windows) == 48 - len(suffix)  # 32 tokens = 4 whole windows fit
                assert all({4 + 8 * ((p - 4) // 8) + i for i in range(8)} <= windows for p in windows)
        decode_steps(session, kv, prompt, total - prompt, boundary_every=20)
        session.flush()
        check_contents(session, kv)
        assert session.stats().max_resident_tokens <= 4 + 48 + 32
    assert pool_used(client) == before


def test_aggregation_observes_fewer_tokens(client):
    with client.open_session(SPEC, "windowkv", dict(BASE, task=pb.TASK_TYPE_AGGREGATION)) as session:
        assert session.observation == 16


def test_decay_gives_early_layers_more(client):
    kv = random_kv(SPEC, 300, seed=9)
    with client.open_session(SPEC, "windowkv", dict(BASE, decay=True, budget=64)) as session:
        session.ingest(kv.contiguous(), random_query(SPEC, 10, session.observation))
        counts = [len(retrieved(session, layer, 0, 300)) for layer in range(4)]
        # budgets [96, 32]: the first group's windows fill 96 (12 windows), the last 32
        assert counts[0] == counts[1] == 96 and counts[2] == counts[3] == 32
        check_contents(session, kv)


def test_budget_fraction_scales_with_the_prompt(client):
    kv = random_kv(SPEC, 400, seed=11)
    with client.open_session(
        SPEC, "windowkv", {"budget_fraction": 0.12, "n_sink": 4, "window": 32}
    ) as session:
        session.ingest(kv.contiguous(), random_query(SPEC, 12, session.observation))
        for layer in range(4):
            kept = retrieved(session, layer, 1, 400)
            assert 48 - 8 < len(kept) <= 48  # round(0.12 * 400) in whole windows of 8
        check_contents(session, kv)


def test_harness_configs_open(client):
    """The configs the accuracy harness passes: {"budget": B} and {"budget_fraction": 0.12}."""
    for config in (
        {"budget": 128, "n_sink": 16, "window": 64},
        {"budget_fraction": 0.12, "n_sink": 16, "window": 64},
    ):
        with client.open_session(SPEC, "windowkv", config) as session:
            session.ingest(random_kv(SPEC, 300, seed=13), random_query(SPEC, 14, session.observation))
            assert session.stats().tokens == 300


def test_dropped_windows_never_come_back(client):
    kv = random_kv(SPEC, 300, seed=15)
    with client.open_session(SPEC, "windowkv", BASE) as session:
        session.ingest(kv[:, :, :, :240].contiguous(), random_query(SPEC, 16, session.observation))
        kept = [retrieved(session, layer, 0, 240) for layer in range(4)]
        decode_steps(session, kv, 240, 60, boundary_every=10)
        for layer in range(4):
            assert retrieved(session, layer, 0, 240) == kept[layer]


def test_pruned_in_host_is_recalled_at_boundaries(client):
    """keep_pruned_in_host: a query aligned with a pruned run of keys brings it back."""
    spec = ModelSpec(2, 1, 1, 16, torch.float32, 512)
    kv = random_kv(spec, 400, seed=17) * 0.1
    direction = torch.randn(16)
    direction /= direction.norm()
    planted = list(range(120, 136))
    kv[:, 0, 0, planted] = direction * 5 + torch.randn(16, 16) * 0.01
    config = dict(BASE, budget=32, group_size=1, keep_pruned_in_host=True, threshold=0.5)
    with client.open_session(spec, "windowkv", config) as session:
        assert session.boundary_mode == pb.BOUNDARY_MODE_THRESHOLD
        assert session.boundary_threshold == pytest.approx(0.5)
        session.ingest(kv.contiguous(), -direction.view(1, 1, 1, 16).expand(2, 1, 32, 16).contiguous())
        assert not set(planted) & set(resident(session, 0, 0))
        session.query.copy_(direction.view(1, 1, 16).expand(2, 1, 16))
        session.boundary([1])
        assert set(planted) <= set(resident(session, 1, 0))
        assert not set(planted) & set(resident(session, 0, 0)), "layers the boundary did not name stay"
        check_contents(session, kv)


@pytest.mark.parametrize("group_select", ["first", "sum"])
def test_who_selects_for_a_group(client, group_select):
    """A needle only the group's second layer attends to: the summed vote keeps it for the whole
    group; the first layer alone does not see it (so neither layer keeps it)."""
    prompt, needle = 200, 101
    kv = random_kv(SPEC, prompt, seed=9) * 0.05
    direction = torch.zeros(SPEC.head_dim)
    direction[0] = 1.0
    kv[1, 0, :, needle] = 6.0 * direction  # layer 1's key of the needle matches the queries
    queries = 6.0 * direction.expand(SPEC.num_layers, SPEC.num_query_heads, 32, -1).clone()
    queries[0] = queries[0].roll(1, dims=-1)  # layer 0's queries look elsewhere
    config = dict(BASE, budget=32, task="TASK_TYPE_LOCALIZATION", group_select=group_select)  # 16 for windows
    with client.open_session(SPEC, "windowkv", config) as session:
        session.ingest(kv, queries)
        for layer in (0, 1):
            for head in range(SPEC.num_kv_heads):
                kept = needle in retrieved(session, layer, head, prompt)
                assert kept == (group_select == "sum"), (layer, head)


# ---- variant "paper": the reference implementation's rule -------------------------------
def test_paper_windows_are_scored_once_across_heads_hand_computed():
    """Windows of 4 over 10 tokens ([0,4), [4,8), [8,10)), 2 query heads. Localisation: per
    head the mean of its top 2 (= 4 // 2) values, then the mean over heads: w0 (0.5 + 2) / 2 =
    1.25, w1 (1 + 1) / 2 = 1.0, w2 (1.5 + 0) / 2 = 0.75. Aggregation: the mean over heads and
    tokens: w0 5 / 8, w1 4 / 8, w2 3 / 4."""
    from kvrecall.server.policies.windowkv import paper_select, paper_window_scores

    mass = torch.tensor([[1.0, 0, 0, 0, 0, 2, 0, 0, 3, 0], [0.0, 0, 0, 4, 0, 0, 1, 1, 0, 0]])
    assert paper_window_scores(mass, 4, "topmean").tolist() == [1.25, 1.0, 0.75]
    assert paper_window_scores(mass, 4, "mean").tolist() == [0.625, 0.5, 0.75]
    # budget 6: ceil((10 - 6) / 4) = 1 window goes, the lowest; two stay (8 tokens: the reference
    # counts windows, not tokens)
    assert paper_select(mass, 6, 4, "topmean").nonzero().flatten().tolist() == list(range(8))
    assert paper_select(mass, 6, 4, "mean").nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9]
    assert bool(paper_select(mass, 10, 4, "mean").all())  # everything fits: everything stays
    assert not bool(paper_select(mass, 1, 4, "mean").any())  # every window would go: none stays
    tie = torch.ones(1, 12)
    assert paper_select(tie, 8, 4, "mean").nonzero().flatten().tolist() == list(range(8))  # ties: earlier stays


def test_paper_budget_decay_is_the_reference_arithmetic():
    from kvrecall.server.policies.windowkv import paper_layer_budgets

    # Llama-3-8B, 512: last = 512 * 8 // 14 = 292, first = 1024 - 292 = 732, step (732 - 292) // 3 = 146
    assert paper_layer_budgets(32, 8, 512) == [732] * 8 + [586] * 8 + [440] * 8 + [292] * 8
    # SmolLM2 (30 layers): 4 groups, the last of 6 layers; last 800 // 14 = 57, first 143, step 28
    assert paper_layer_budgets(30, 8, 100) == [143] * 8 + [115] * 8 + [87] * 8 + [57] * 6
    assert paper_layer_budgets(6, 8, 64) == [64] * 6


@pytest.mark.parametrize("variant", ["paper", "tuned"])
def test_paper_variant_shares_windows_across_heads(client, variant):
    """A needle only KV head 0 attends to: the paper's head-shared choice keeps it for both
    heads, the tuned per-head choice only for head 0."""
    prompt, needle = 200, 101
    kv = random_kv(SPEC, prompt, seed=9) * 0.05
    direction = torch.zeros(SPEC.head_dim)
    direction[0] = 1.0
    kv[:, 0, 0, needle] = 6.0 * direction  # every layer, KV head 0: the needle's key matches
    queries = 6.0 * direction.expand(SPEC.num_layers, SPEC.num_query_heads, 32, -1).clone()
    config = dict(BASE, budget=32, group_size=4, task="TASK_TYPE_LOCALIZATION", variant=variant)  # one group: no decay
    with client.open_session(SPEC, "windowkv", config) as session:
        session.ingest(kv, queries)
        for layer in range(SPEC.num_layers):
            assert needle in retrieved(session, layer, 0, prompt), layer
            assert (needle in retrieved(session, layer, 1, prompt)) == (variant == "paper"), layer
            kept = [retrieved(session, layer, head, prompt) for head in range(SPEC.num_kv_heads)]
            assert (kept[0] == kept[1]) == (variant == "paper")


def test_bad_variant_is_refused(client):
    with pytest.raises(InvalidArgumentError, match="variant"):
        client.open_session(SPEC, "windowkv", dict(BASE, variant="published"))
