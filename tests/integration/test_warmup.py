"""The daemon's start-up warm-up: its serving path (streamed ingest, append, boundaries with one
and several queries per head, a chunk, a Boundaries call over two sessions) runs in-process on real pools and leaves nothing
behind. On a CUDA daemon this is what compiles the kernels before the first session."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server.config import ConfigError, load_config, parse_warmup
from kvrecall.server.layout import ModelLayout
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.session import SessionRegistry
from kvrecall.server.warmup import DEFERRED, POLICIES, _run_policy, warm_up


def test_every_warmup_session_runs_and_returns_its_memory(caplog):
    caplog.set_level("WARNING", logger="kvrecall.warmup")
    host, device = HostPool(64 << 20, page_bytes=256 << 10), DevicePool(64 << 20, torch.device("cpu"))
    registry = SessionRegistry(host, device, default_lease=30.0)
    try:
        generator = torch.Generator().manual_seed(0)
        for (message, prompt), deferred in [*((p, False) for p in POLICIES), *((p, True) for p in DEFERRED)]:
            layout = ModelLayout(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32,
                                 max_tokens=prompt + 256)  # fmt: skip
            _run_policy(registry, layout, message, prompt, torch.device("cpu"), generator, deferred)
        assert not registry.sessions and host.used_bytes == 0 and device.used_bytes == 0
        # every path ran, the background retrievals (staged for their workers too) included
        assert not [r.getMessage() for r in caplog.records if r.name == "kvrecall.warmup"]
        assert warm_up(registry, [(torch.bfloat16, 128)]) == 0.0  # CPU: the references compile nothing
    finally:
        host.close()


def test_the_warmup_setting_is_validated():
    assert parse_warmup("bfloat16:128, float16:64") == [(torch.bfloat16, 128), (torch.float16, 64)]
    assert parse_warmup("") == []
    with pytest.raises(ConfigError, match="warmup"):
        load_config(None, {"warmup": "bf16:128"}, env={})
    with pytest.raises(ConfigError, match="warmup"):
        load_config(None, {"warmup": "bfloat16:0"}, env={})
