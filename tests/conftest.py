"""Shared fixtures: a real daemon process, synthetic layouts, and the bundled model."""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported: set it before any test module imports it,
    # so the kernel tests run their Triton kernels in the interpreter on CPU machines.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kvrecall.client import KVRecallClient, ModelSpec  # noqa: E402
from kvrecall.local import LocalDaemon  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMALL = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, visibly, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def daemon():
    """One real daemon for the session (unix socket, shared-memory transport)."""
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25) as d:
        yield d


@pytest.fixture
def client(daemon):
    with KVRecallClient(daemon.target, "test-worker", timeout=30.0) as c:
        yield c


@contextlib.contextmanager
def daemon_client(env: dict[str, str], timeout: float = 60.0):
    """A client of a daemon of its own (the conftest daemon's pools) with `env` (KVRECALL_* settings)."""
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env=env) as d:
        with KVRecallClient(d.target, "test-worker", timeout=timeout) as c:
            yield c


@pytest.fixture(scope="session")
def smollm():
    """The bundled SmolLM2-135M-Instruct (fp32, CPU), loaded once."""
    from kvrecall.models.smollm import load_model

    model, tokenizer = load_model()
    return model, tokenizer


def random_kv(spec: ModelSpec, tokens: int, seed: int) -> torch.Tensor:
    """[L, 2, H, T, D] random prompt KV."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim, generator=g).to(spec.dtype)


def random_query(spec: ModelSpec, seed: int, n_obs: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.num_layers, spec.num_query_heads, n_obs, spec.head_dim, generator=g).to(spec.dtype)


def pool_used(client: KVRecallClient) -> dict[str, int]:
    return {p.tier: p.used_bytes for p in client.stats().pools}
