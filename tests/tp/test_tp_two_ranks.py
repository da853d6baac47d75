"""Tensor parallelism 2 on CPU: two rank processes (gloo), each with its own real daemon.

One launch of `kvrecall.tp.check` and one of `kvrecall worker` per module (~60 s on 2 cores):
every rank decodes a tiny random llama (4 layers, 8 query heads, 4 KV heads) through a
session on its own daemon holding its 2 KV heads; the tests below read what each rank wrote
and what its daemon says.
"""

from __future__ import annotations

import json

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.tp.launch import rank_daemons, run_ranks

WORLD = 2
STEPS = 24


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    with rank_daemons(WORLD, "cpu", out) as daemons:
        targets = ",".join(d.target for d in daemons)
        run_ranks(
            "kvrecall.tp.check",
            ["--targets", targets, "--out", str(out), "--steps", str(STEPS), "--single"],
            WORLD,
            out,
            timeout=600,
            env={"OMP_NUM_THREADS": "1"},  # two ranks and two daemons share the CPU cores
        )
        worker_logs = run_ranks(
            "kvrecall.cli",
            lambda rank: [
                "worker", "--target", daemons[rank].target, "--device", "cpu", "--policy", "louiskv",
                "--worker-id", "tp-worker",
                "--sessions", "1", "--context-tokens", "120", "--budget", "32", "--max-new-tokens", "8",
                "--policy-config", '{"min_gap": 0}',  # 8 tokens: the default gap (8) would leave no boundary
            ],
            WORLD,
            out,
            timeout=300,
            env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        pools = []
        for daemon in daemons:
            with KVRecallClient(daemon.target, "") as client:  # no worker id: every session
                stats = client.stats()
                pools.append(({p.tier: p.used_bytes for p in stats.pools}, len(stats.sessions)))
    results = [json.loads((out / f"check-rank{r}.json").read_text()) for r in range(WORLD)]
    workers = [[json.loads(line) for line in log.splitlines() if line.startswith("{")] for log in worker_logs]
    return results, pools, workers


def test_budget_covering_the_sequence_reproduces_full_attention_on_every_rank(ranks):
    results, *_ = ranks
    for r in results:
        assert r["world"] == WORLD
        assert r["exact"]["max_logit_diff_vs_full"] < 1e-4, r["exact"]
        assert r["exact"]["daemon"]["tokens"] == r["exact"]["daemon"]["prompt_tokens"] + STEPS - 1


def test_ranks_take_the_same_boundary_decisions(ranks):
    results, *_ = ranks
    for run in ("exact", "small"):
        steps = [r[run]["boundary_steps"] for r in results]
        assert steps[0] == steps[1], f"{run}: ranks retrieved on different steps {steps}"
        # a mix of decisions, so agreement is not trivially "always" or "never"
        assert 0 < len(steps[0]) < STEPS - 1, steps[0]
        assert [r[run]["append_steps"] for r in results][0] == results[1][run]["append_steps"]
        assert all(r[run]["agreements"] == STEPS - 1 for r in results), "one agreement per decode step"


def test_retrievals_match_the_daemon_stats_on_both_ranks(ranks):
    results, *_ = ranks
    for rank, r in enumerate(results):
        for run in ("exact", "small"):
            daemon = r[run]["daemon"]
            assert daemon["boundaries"] == len(r[run]["boundary_steps"]) == r[run]["cache_boundaries"]
            assert (daemon["tp_rank"], daemon["tp_size"]) == (rank, WORLD)
        assert r["small"]["daemon"]["max_resident_tokens"] < r["small"]["daemon"]["tokens"]


def test_tensor_parallel_run_equals_the_single_process_run(ranks):
    """LouisKV selects per KV head: with the same boundary steps, the two shards retrieve what
    one all-heads session retrieves, so the logits are those of the single-process run."""
    results, *_ = ranks
    single = results[0]["single"]
    assert single["boundary_steps"] == results[0]["small"]["boundary_steps"]
    assert single["max_logit_diff_vs_tp"] < 1e-4
    assert (single["daemon"]["tp_rank"], single["daemon"]["tp_size"]) == (0, 0)
    assert results[0]["small"]["max_logit_diff_vs_full"] > 1e-3, "the small budget must matter"


def test_closed_sessions_return_every_byte_on_both_daemons(ranks):
    _, pools, _ = ranks
    for used, sessions in pools:
        assert sessions == 0
        assert used == {"host": 0, "device": 0}, used


def test_kvrecall_worker_runs_as_a_tensor_parallel_rank(ranks):
    """`kvrecall worker` with WORLD_SIZE=2 (what compose's tp profile starts) decodes as one rank."""
    *_, workers = ranks
    assert [len(lines) for lines in workers] == [1, 1], workers
    for rank, (line,) in enumerate(workers):
        assert (line["rank"], line["world"], line["ranks_agree"]) == (rank, WORLD, True), line
        assert line["generated_tokens"] == 8 and line["retrievals"] >= 1
    assert workers[0][0]["retrievals"] == workers[1][0]["retrievals"]
