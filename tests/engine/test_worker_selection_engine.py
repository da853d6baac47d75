"""Worker selection (the daemon's worker_selection: the worker chooses a louiskv retrieval over its
mapped unit table, kvrecall/client/selection.py; the daemon places the choice from the host)
under the engine, against real CPU daemons: sessions crossing boundaries decode the same tokens
and logits as on a daemon that chooses itself the same way (`select_before_close`: over the table
as the notices left it, the open segment closed after), overlap off and on; the daemon's metrics
say the workers chose, and only sessions of a worker_selection daemon map a table.

`max_segment` is above the decode's length, so only boundaries close segments: a notice riding
in a crossing's event (applied by the daemon after the worker chose, before a daemon's own
choice) then closes none, and the two choose over the same table."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.selection import WorkerTable
from kvrecall.local import LocalDaemon
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)
from tests.engine.test_worker_copies_engine import decode
from tests.integration.test_boundaries_follows import metric
from tests.integration.test_quotas_metrics import free_port

CONFIG = {"budget": 32, "window": 32, "max_segment": 512}  # ingest_select "tokens": pinned tokens from the ingest
ARMS = {
    "worker": {"KVRECALL_WORKER_SELECTION": "1"},  # placed from the host
    "worker-device": {"KVRECALL_WORKER_SELECTION": "1", "KVRECALL_WORKER_SELECTION_PLACE": "device"},
    "daemon": {"KVRECALL_SELECT_BEFORE_CLOSE": "1"},
}


def decode_arm(model, env: dict, device: str = "cpu", **daemon_args) -> dict:
    """{overlap: decode's result, "worker_choices": the daemon's count} for one daemon at worker
    copy share 1 with `env`."""
    port = free_port()
    env = {**env, "KVRECALL_WORKER_COPY_SHARE": "1"}
    daemon_device = "cuda:0" if device == "cuda" else device
    extra = [*daemon_args.pop("extra_args", []), "--metrics-port", str(port)]
    with LocalDaemon(device=daemon_device, env=env, extra_args=extra, **daemon_args) as d:
        with KVRecallClient(d.target, "worker-selection") as client:
            # (follow_notices off: a crossing takes its last notice's answer first, as a slot that
            # chooses itself does, so both mask the tokens it evicted from the same step on)
            out = {overlap: decode(client, model, overlap, device, CONFIG, follow_notices=False)
                   for overlap in (False, True)}  # fmt: skip
        url = f"http://127.0.0.1:{port}/metrics"
        out["worker_choices"] = {place: metric(url, f'kvrecall_host_selections_total{{fetch="{place}"}}')
                                 for place in ("worker", "worker-device")}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return {arm: decode_arm(tiny_llama, env, host_pool_gb=0.5, device_pool_gb=0.25) for arm, env in ARMS.items()}


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("arm", ["worker", "worker-device"])
def test_the_workers_choice_decodes_as_the_daemons(runs, arm, overlap):
    worker, daemon = runs[arm], runs["daemon"]
    assert all(worker[overlap]["tables"]) and not any(daemon[overlap]["tables"]), "who maps a table"
    assert worker["worker_choices"][arm] > 0, "no retrieval was the worker's choice, placed as configured"
    assert sum(worker["worker_choices"].values()) == worker["worker_choices"][arm]
    assert sum(daemon["worker_choices"].values()) == 0
    assert worker[overlap]["staged"] > 0
    assert worker[overlap]["tokens"] == daemon[overlap]["tokens"]
    torch.testing.assert_close(worker[overlap]["logits"], daemon[overlap]["logits"], rtol=0, atol=1e-5)
    assert worker[overlap]["units"] == daemon[overlap]["units"], "the boundaries closed the same segments"


@pytest.mark.parametrize("arm", ["worker", "worker-device"])
def test_a_choice_over_fewer_columns_than_filled_is_the_daemons(tiny_llama, runs, arm, monkeypatch, tmp_path):  # noqa: F811
    """A worker whose bound on the filled columns fell short: the daemon chooses itself (the
    same choice), says so in its log, and the decode is the same."""
    monkeypatch.setattr(WorkerTable, "widths", lambda self, tokens: (1, 1))
    log = tmp_path / "daemon.log"
    short = decode_arm(tiny_llama, ARMS[arm], host_pool_gb=0.5, device_pool_gb=0.25, log_path=str(log))
    assert "the daemon chooses" in log.read_text()
    for overlap in (False, True):
        assert short[overlap]["tokens"] == runs["daemon"][overlap]["tokens"]
        torch.testing.assert_close(short[overlap]["logits"], runs["daemon"][overlap]["logits"], rtol=0, atol=1e-5)
