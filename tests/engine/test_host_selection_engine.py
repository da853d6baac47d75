"""Host selection (the daemon's host_selection, server/host_selection.py) under the engine, against
real CPU daemons: louiskv sessions crossing boundaries (worker copies at share 1, so every row is
staged) decode the same tokens and logits whether the daemon selects and places on its device
(the default) or on the host from its copy of the unit table, overlap off and on; the daemon's
metrics say the host did select, fetching each session's table whole once and then only the
segments closed since. The prompts leave the window at ingest and the decode closes
segments between crossings, so the host copy follows both the whole-table fetch and the logged
closes."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)
from tests.engine.test_worker_copies_engine import decode
from tests.integration.test_boundaries_follows import metric
from tests.integration.test_quotas_metrics import free_port

SERIES = "kvrecall_host_selections_total"


def decode_host_selection(model, host: bool, device: str = "cpu", env: dict | None = None, **daemon_args) -> dict:
    """{overlap: decode's result, "host_selections": the daemon's count} for one daemon at worker
    copy share 1 with host_selection on or off."""
    port = free_port()
    env = {**(env or {}), "KVRECALL_WORKER_COPY_SHARE": "1", "KVRECALL_HOST_SELECTION": "1" if host else "0"}
    daemon_device = "cuda:0" if device == "cuda" else device
    extra = [*daemon_args.pop("extra_args", []), "--metrics-port", str(port)]
    with LocalDaemon(device=daemon_device, env=env, extra_args=extra, **daemon_args) as d:
        with KVRecallClient(d.target, "host-selection") as client:
            out = {overlap: decode(client, model, overlap, device) for overlap in (False, True)}
        url = f"http://127.0.0.1:{port}/metrics"
        out["fetches"] = {kind: metric(url, f'{SERIES}{{fetch="{kind}"}}') for kind in ("whole", "log")}
        out["host_selections"] = sum(out["fetches"].values())
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return {host: decode_host_selection(tiny_llama, host, host_pool_gb=0.5, device_pool_gb=0.25)
            for host in (False, True)}  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
def test_host_selection_decodes_as_the_device_selection(runs, overlap):
    device, host = runs[False], runs[True]
    assert device["host_selections"] == 0, "host_selection off: the device selected"
    assert host["host_selections"] > 0, "host_selection on: no retrieval was selected on the host"
    # each session's first fetch is whole, later ones only the closed segments (not a whole table a retrieval)
    assert 0 < host["fetches"]["whole"] < host["fetches"]["log"], host["fetches"]
    assert host[overlap]["staged"] > 0 and all(host[overlap]["lights"])
    assert host[overlap]["tokens"] == device[overlap]["tokens"]
    torch.testing.assert_close(host[overlap]["logits"], device[overlap]["logits"], rtol=0, atol=1e-5)
