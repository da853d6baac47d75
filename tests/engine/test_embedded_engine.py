"""The daemon embedded in its worker's process (kvrecall.server.embedded) against a daemon process:
louiskv sessions crossing boundaries (worker copies at share 0 and 1) decode the same tokens and
logits, overlap off and on; the embedded daemon serves health and stops cleanly, and a session
left open by the worker is released at its stop."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from kvrecall.server.embedded import EmbeddedDaemon
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)
from tests.engine.test_worker_copies_engine import decode

SHARES = ("0", "1")


def decode_with(
    model, kind: str, share: str, log_path: str, device: str = "cpu", env: dict | None = None
) -> dict:
    """{overlap: decode's result, "stop_code", "log"} with one daemon of `kind` ("process" or
    "embedded"; its KVRECALL_* settings: env), a session left open when it stops."""
    env = {**(env or {}), "KVRECALL_WORKER_COPY_SHARE": share}
    daemon_device = "cuda:0" if device == "cuda" else device
    daemon_class = LocalDaemon if kind == "process" else EmbeddedDaemon
    daemon = daemon_class(
        host_pool_gb=0.5, device_pool_gb=0.25, device=daemon_device, env=env, log_path=log_path
    )
    daemon.start()
    out: dict = {}
    try:
        with KVRecallClient(daemon.target, f"embedded-{kind}") as client:
            assert client.health() == "SERVING"
            out = {overlap: decode(client, model, overlap, device) for overlap in (False, True)}
            client.open_session(*_small_spec(model), device=device)  # left open
    finally:
        out["stop_code"] = daemon.stop()
    with open(log_path) as f:
        out["log"] = f.read()
    return out


def _small_spec(model):
    from kvrecall.client.hf import spec_for

    return spec_for(model, max_tokens=64), "full", {}


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):  # noqa: F811
    logs = tmp_path_factory.mktemp("embedded")
    return {(kind, share): decode_with(tiny_llama, kind, share, str(logs / f"{kind}-{share}.log"))
            for kind in ("process", "embedded") for share in SHARES}  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("share", SHARES)
def test_embedded_daemon_decodes_as_a_daemon_process(runs, share, overlap):
    process, embedded = runs["process", share][overlap], runs["embedded", share][overlap]
    assert (embedded["staged"] > 0) == (share == "1"), "worker copies as the share says"
    assert embedded["tokens"] == process["tokens"]
    torch.testing.assert_close(embedded["logits"], process["logits"], rtol=0, atol=1e-6)


def test_embedded_daemon_stops_cleanly(runs):
    for share in SHARES:
        run = runs["embedded", share]
        assert run["stop_code"] == 0, run["log"][-2000:]
        assert "shutting down: 1 open sessions will be released" in run["log"]
        assert run["log"].rstrip().endswith("stopped"), run["log"][-2000:]


def test_embedded_daemon_reports_a_bad_setting():
    from kvrecall.server.config import ConfigError

    with pytest.raises(ConfigError, match="KVRECALL_WORKER_COPY_SHARE"):
        EmbeddedDaemon(env={"KVRECALL_WORKER_COPY_SHARE": "2"})
