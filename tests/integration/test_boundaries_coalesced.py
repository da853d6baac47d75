"""Coalesced retrievals through a real daemon (`coalesce_retrievals`, kvrecall/server/coalesce.py):
each step, every session's retrieval goes in a Boundaries call of its own, all in flight at
once, as a lagged engine's calls overlap; the daemon (by default) serves the calls that queue
behind a run together, or with the setting off runs each call in a thread of its own. The working sets stay bitwise equal to twins that retrieve one by one on their Decode
streams, and the daemon's histogram shows runs that served several calls."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, StepCall
from kvrecall.local import LocalDaemon
from tests.conftest import random_kv
from tests.integration.test_boundaries_batch import SPEC, open_ingested, same_working_set, write_step
from tests.integration.test_boundaries_follows import metric
from tests.integration.test_quotas_metrics import free_port

RESIDENT = {"budget": 48, "n_sink": 4, "window": 32}
CASES = [
    ("louiskv", {**RESIDENT, "cluster_size": 8, "max_segment": 16}),
    ("quest", {**RESIDENT, "page_size": 8}),
    ("windowkv", {**RESIDENT, "window_size": 8, "group_size": 2, "keep_pruned_in_host": True}),
]
PROMPTS = (60, 201, 260)
STEPS = 24


@pytest.fixture(scope="module", params=["default", "off"])
def coalescing(request):
    """A daemon with coalesce_retrievals as by default (on) or turned off, and its metrics served:
    (client, the metrics URL, whether it coalesces)."""
    port = free_port()
    env = {"KVRECALL_COALESCE_RETRIEVALS": "0"} if request.param == "off" else {}
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env=env, extra_args=["--metrics-port", str(port)]) as d:
        with KVRecallClient(d.target, "test-worker", timeout=60.0) as c:
            yield c, f"http://127.0.0.1:{port}/metrics", request.param != "off"


def test_calls_in_flight_together_equal_them_one_by_one(coalescing):
    check_in_flight_equal_one_by_one(*coalescing)


def check_in_flight_equal_one_by_one(client, url: str, coalesces: bool, transport: str = "shm") -> None:
    """Every step, each session's retrieval in a call of its own, all in flight at once, against
    twins retrieving one by one on their Decode streams: bitwise equal working sets and
    outcomes; with coalescing the daemon's histogram shows every call served, some together."""
    twins = []
    for policy, config in CASES:
        for tokens in PROMPTS:
            seed = 10 * len(twins)
            twins.append((open_ingested(client, policy, config, tokens, seed, transport),
                          open_ingested(client, policy, config, tokens, seed, transport), tokens + STEPS, seed))  # fmt: skip
    runs, calls = metric(url, "kvrecall_retrieval_run_calls_count"), metric(url, "kvrecall_retrieval_run_calls_sum")
    try:
        for step in range(STEPS):
            pending = []
            for i, (batched, alone, length, seed) in enumerate(twins):
                kv = random_kv(SPEC, length, seed)
                query = torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim,
                                    generator=torch.Generator().manual_seed(1000 * step + i))  # fmt: skip
                write_step(batched, kv, query)
                write_step(alone, kv, query)
                notice = batched.core.needs_append()
                retrieve = step % 3 == 0 or (step + i) % 2 == 0
                if notice:  # notices first, in a call of their own (the engine's order)
                    client.boundaries([StepCall(batched, batched.core.position, notice=True)])
                    alone.append()
                if retrieve:
                    pending.append((StepCall(batched, batched.core.position, retrieve=True), alone))
            # Every retrieval in flight at once, then the twins' one by one.
            futures = [client.boundaries_future([call], background=True) for call, _ in pending]
            answers = [future.result().results[0].retrieval for future in futures]
            for (call, alone), answer in zip(pending, answers, strict=True):
                want = alone.boundary(position=alone.core.position)
                assert (answer.units_selected, answer.tokens_placed, answer.tokens_gathered, answer.bytes_moved) == (
                    want.units_selected, want.tokens_placed, want.tokens_gathered, want.bytes_moved,
                ), f"{call.session.policy_config} at step {step}: each call gets its own outcome"  # fmt: skip
            for batched, alone, _, _ in twins:
                assert same_working_set(batched, alone), f"{batched.policy_config} at step {step}"
        for batched, alone, _, _ in twins:
            a, b = batched.stats(), alone.stats()
            assert (a.boundaries, a.bytes_host_to_device) == (b.boundaries, b.bytes_host_to_device)
    finally:
        for batched, alone, _, _ in twins:
            batched.close()
            alone.close()
    runs = metric(url, "kvrecall_retrieval_run_calls_count") - runs
    calls = metric(url, "kvrecall_retrieval_run_calls_sum") - calls
    sent = sum(1 for step in range(STEPS) for i in range(len(twins)) if step % 3 == 0 or (step + i) % 2 == 0)
    if not coalesces:
        assert calls == runs == 0, "with coalesce_retrievals off every call runs on its own, outside the coalescer"
        return
    assert calls == sent, "every retrieving call was served by one run"
    assert runs < calls, "some runs served calls that queued behind another"
