"""Every byte admitted: a policy's device metadata is reserved in the device pool at
OpenSession (RESOURCE_EXHAUSTED names it when it does not fit), shown per session in the
stats, and returned on close. Real daemon, real gRPC."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.client.core import policy_message
from kvrecall.client.errors import ResourceExhaustedError
from kvrecall.local import LocalDaemon
from kvrecall.server.config import ServerConfig
from kvrecall.server.layout import ModelLayout, SegmentLayout
from kvrecall.server.policies import build_policy
from tests.conftest import random_kv

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=2000)
DEVICE_POOL_BYTES = 1 << 20


def expected(spec: ModelSpec, policy: str, config: dict | None) -> tuple[int, int]:
    """(working set bytes, metadata bytes) the daemon's policy asks for (a mapped session's segment:
    with the staging area of the daemon's default worker_copy_share where it retrieves)."""
    layout = ModelLayout(**{k: v for k, v in dataclasses.asdict(spec).items() if k != "device"})
    built = build_policy(policy_message(policy, config), layout)
    plan = built.plan()
    if plan.retrieved:
        plan = plan.with_staging(ServerConfig().worker_copy_share)
    return SegmentLayout.of(layout, plan).nbytes, built.metadata_bytes()


@pytest.fixture(scope="module")
def small_device_pool():
    with LocalDaemon(host_pool_gb=0.125, device_pool_gb=DEVICE_POOL_BYTES / (1 << 30)) as d:
        with KVRecallClient(d.target, "meta-worker") as client:
            yield d, client


def pools(client) -> dict[str, int]:
    return {p.tier: p.used_bytes for p in client.stats().pools}


@pytest.mark.parametrize("policy,config", [("louiskv", {"budget": 64}), ("quest", {"budget": 64, "page_size": 1})])
def test_metadata_that_does_not_fit_is_refused_and_named(small_device_pool, policy, config):
    _, client = small_device_pool
    big = dataclasses.replace(SPEC, max_tokens=40_000)
    ws, metadata = expected(big, policy, config)
    assert ws < DEVICE_POOL_BYTES < ws + metadata  # the working set alone would fit
    with pytest.raises(ResourceExhaustedError) as refused:
        client.open_session(big, policy, config)
    assert f"policy metadata of {metadata} bytes" in str(refused.value)
    assert pools(client) == {"host": 0, "device": 0}
    # a policy with no metadata fits the same layout
    with client.open_session(big, "streaming", {"window": 64}):
        assert pools(client)["device"] == expected(big, "streaming", {"window": 64})[0]


def test_metadata_is_reserved_shown_and_returned(small_device_pool):
    daemon, client = small_device_pool
    ws, metadata = expected(SPEC, "louiskv", {"budget": 64})
    assert metadata > 0
    with client.open_session(SPEC, "louiskv", {"budget": 64}) as session:
        session.ingest(random_kv(SPEC, 600, seed=1), torch.randn(2, 4, session.observation, 16))
        stats = session.stats()
        assert stats.metadata_bytes == metadata
        assert stats.device_bytes == ws + metadata
        assert pools(client)["device"] == ws + metadata
        view = subprocess.run([sys.executable, "-m", "kvrecall.cli", "stats", "--target", daemon.target, "--json"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert int(json.loads(view.stdout)["sessions"][0]["metadata_bytes"]) == metadata
    assert pools(client) == {"host": 0, "device": 0}


@pytest.mark.parametrize("unit_reps", ["layout", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_estimate_bounds_what_the_tables_allocate(dtype, unit_reps, monkeypatch):
    """(unit_reps: the daemon's unit_reps_dtype; fp8 tables hold a byte a representative element.)"""
    from kvrecall.server.policies import louiskv

    monkeypatch.setattr(louiskv, "_fp8_reps", unit_reps == "fp8")
    layout = ModelLayout(num_layers=3, num_kv_heads=2, num_query_heads=4, head_dim=32, dtype=dtype, max_tokens=5000)
    for policy, config in (("louiskv", {"budget": 256}), ("quest", {"budget": 256})):
        built = build_policy(policy_message(policy, config), layout)
        if policy == "louiskv":
            table = built._table(torch.device("cpu"))
            held = sum(t.numel() * t.element_size() for t in (table.reps, table.sizes, table.valid, table.position))
            held += layout.num_layers * layout.num_kv_heads * (layout.head_dim * 4 + built.config.pinned_tokens * 8)
            assert table.reps.dtype == (torch.float8_e4m3fn if unit_reps == "fp8" else dtype)
            assert held == built.metadata_bytes()  # the table as allocated, nothing more
        else:
            built._allocate(torch.device("cpu"))
            held = 2 * built.kmin.numel() * built.kmin.element_size()
        assert 0 < held <= built.metadata_bytes()


def test_louiskv_reserves_four_bytes_per_candidate():
    """A Llama-3-8B shape (32 x 8 rows, D 128, bf16) at 32K tokens: per row, 32K / 16 + 2 units
    (bf16 rep, int32 size, bool valid) and 32K candidates of an int32 position each (a
    candidate's unit and rank follow from the sizes: not stored), then the open segment's f32
    sum and the pinned int64 tokens."""
    layout = ModelLayout(num_layers=32, num_kv_heads=8, num_query_heads=32, head_dim=128, dtype=torch.bfloat16,
                         max_tokens=32768)  # fmt: skip
    built = build_policy(policy_message("louiskv", {"budget": 512}), layout)
    rows, units, tokens, pinned = 32 * 8, 32768 // 16 + 2, 32768, built.config.pinned_tokens
    per_row = units * (128 * 2 + 4 + 1) + tokens * 4 + 128 * 4 + pinned * 8
    assert built.metadata_bytes() == rows * per_row
