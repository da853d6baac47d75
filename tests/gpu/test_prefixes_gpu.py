"""Shared prefixes on a CUDA daemon (CUDA IPC working sets, pinned host pages): a session over a
held prefix matches one that ingested it, after a question chunk and a retrieval."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon
from kvrecall.prefix import declare
from tests.gpu import NO_WARMUP
from tests.integration.test_prefixes import (
    DOC,
    DOC_IDS,
    POLICIES,
    assert_same,
    ingest,
    question_and_retrieval,
    state,
)

pytestmark = pytest.mark.gpu

SPEC = ModelSpec(num_layers=4, num_kv_heads=2, num_query_heads=8, head_dim=64, dtype=torch.bfloat16, max_tokens=400)


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_shared_prefix_on_cuda(policy, config):
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.5, device="cuda:0", extra_args=["--page-kb", "64", *NO_WARMUP]) as d:
        with KVRecallClient(d.target, "gpu-prefix") as client:
            with client.open_session(SPEC, policy, config, device="cuda:0") as alone:
                ingest(alone, SPEC, "cuda")
                after_ingest = state(alone)
                expected = question_and_retrieval(alone, 11, SPEC, "cuda")
            shared = declare(DOC_IDS, "gpu-random-kv", chunk_tokens=64)
            with client.open_session(SPEC, policy, config, device="cuda:0", prefix=shared) as first:
                ingest(first, SPEC, "cuda")
                with client.open_session(SPEC, policy, config, device="cuda:0", prefix=shared) as second:
                    torch.cuda.synchronize()
                    assert second.prefix_held == DOC
                    assert_same(state(second), after_ingest)
                    assert_same(question_and_retrieval(second, 11, SPEC, "cuda"), expected)
                assert_same(question_and_retrieval(first, 11, SPEC, "cuda"), expected)


@pytest.mark.parametrize("policy,config", POLICIES, ids=[p for p, _ in POLICIES])
def test_a_turn_over_a_held_prefix_registers_its_own_on_cuda(policy, config):
    from tests.integration.test_prefixes import check_turn_chain

    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.5, device="cuda:0", extra_args=["--page-kb", "64", *NO_WARMUP]) as d:
        with KVRecallClient(d.target, "gpu-prefix-chain") as client:
            check_turn_chain(client, policy, config, SPEC, "cuda:0")
