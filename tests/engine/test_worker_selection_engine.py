"""Worker selection (the daemon's worker_selection: the worker chooses a louiskv retrieval over its
mapped unit table and open segment, kvrecall/client/selection.py; the daemon places the choice
from the host, or with its placement kernels under worker_selection_place=device) under the
engine, against real CPU daemons: sessions crossing boundaries decode the same tokens and logits,
and close the same segments, as on a daemon that chooses itself (the default), with eviction
notices waited for, and deferred (a crossing's retrieval following a notice whose answer is not
taken, a notice riding in its event) with overlap off and on; the daemon's metrics say the
workers chose every crossing but each session's first (before an answer said what its table
holds), and only sessions of a worker_selection daemon map a table. A choice whose meta the
daemon's table does not hold is the daemon's own, and logged."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.selection import WorkerTable
from kvrecall.local import LocalDaemon
from tests.engine.test_engine import tiny_llama  # noqa: F401 (the fixture)
from tests.engine.test_worker_copies_engine import STEPS, decode
from tests.integration.test_boundaries_follows import metric
from tests.integration.test_quotas_metrics import free_port

CONFIG = {"budget": 32, "window": 32, "max_segment": 32}  # ingest_select "tokens": pinned tokens from the ingest
ARMS = {
    "worker": {"KVRECALL_WORKER_SELECTION": "1"},  # placed from the host
    "worker-device": {"KVRECALL_WORKER_SELECTION": "1", "KVRECALL_WORKER_SELECTION_PLACE": "device"},
    # placed by the daemon's kernels into the working set itself (no staging area: the daemon's copies)
    "worker-device-unstaged": {"KVRECALL_WORKER_SELECTION": "1", "KVRECALL_WORKER_SELECTION_PLACE": "device",
                               "KVRECALL_WORKER_COPY_SHARE": "0"},
    "daemon": {},
}
LABEL = {"worker": "worker", "worker-device": "worker-device", "worker-device-unstaged": "worker-device"}
PLACES = tuple(LABEL)


def decode_arm(model, env: dict, device: str = "cpu", deferred: bool = False, **daemon_args) -> dict:
    """{overlap: decode's result, "worker_choices": {place: the daemon's count}} for one daemon at
    worker copy share 1 with `env`; overlap off and (deferred eviction only) on."""
    port = free_port()
    env = {"KVRECALL_WORKER_COPY_SHARE": "1", **env}
    daemon_device = "cuda:0" if device == "cuda" else device
    extra = [*daemon_args.pop("extra_args", []), "--metrics-port", str(port)]
    with LocalDaemon(device=daemon_device, env=env, extra_args=extra, **daemon_args) as d:
        with KVRecallClient(d.target, "worker-selection") as client:
            out = {overlap: decode(client, model, overlap, device, CONFIG, deferred=deferred)
                   for overlap in ((False, True) if deferred else (False,))}  # fmt: skip
        url = f"http://127.0.0.1:{port}/metrics"
        out["worker_choices"] = {place: metric(url, f'kvrecall_host_selections_total{{fetch="{place}"}}')
                                 for place in ("worker", "worker-device")}  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama):  # noqa: F811
    return {(arm, deferred): decode_arm(tiny_llama, env, deferred=deferred, host_pool_gb=0.5, device_pool_gb=0.25)
            for arm, env in ARMS.items() for deferred in (False, True)}  # fmt: skip


@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize("arm", PLACES)
def test_the_workers_choice_decodes_as_the_daemons(runs, arm, deferred):
    worker, daemon = runs[arm, deferred], runs["daemon", deferred]
    crossings = sum(1 for step in range(STEPS) for slot in range(3) if step % 6 == 2 * slot)
    decodes = 2 if deferred else 1  # (overlap off, and on with deferred eviction)
    assert worker["worker_choices"][LABEL[arm]] == decodes * (crossings - 3), worker["worker_choices"]
    assert sum(worker["worker_choices"].values()) == worker["worker_choices"][LABEL[arm]]
    assert sum(daemon["worker_choices"].values()) == 0
    for overlap in (False, True)[:decodes]:
        mine, theirs = worker[overlap], daemon[overlap]
        assert all(mine["tables"]) and not any(theirs["tables"]), "who maps a table"
        assert (mine["staged"] > 0) == (arm != "worker-device-unstaged")
        assert mine["tokens"] == theirs["tokens"]
        torch.testing.assert_close(mine["logits"], theirs["logits"], rtol=0, atol=1e-5)
        assert mine["units"] == theirs["units"], "the boundaries closed the same segments"


def test_over_an_fp8_table_the_workers_choice_decodes_as_the_daemons(tiny_llama):  # noqa: F811
    """Daemons whose unit tables hold float8 representatives (unit_reps_dtype fp8): the worker maps
    the fp8 table (the wire's FLOAT8_E4M3FN), chooses every crossing but the first of each session,
    and decodes the tokens, logits and closed segments of a daemon that chooses itself."""
    fp8 = {"KVRECALL_UNIT_REPS_DTYPE": "fp8"}
    worker = decode_arm(tiny_llama, {**ARMS["worker"], **fp8}, host_pool_gb=0.5, device_pool_gb=0.25)
    daemon = decode_arm(tiny_llama, fp8, host_pool_gb=0.5, device_pool_gb=0.25)
    assert worker["worker_choices"]["worker"] > 0 and sum(daemon["worker_choices"].values()) == 0
    mine, theirs = worker[False], daemon[False]
    assert all(mine["tables"]) and not any(theirs["tables"]), "who maps a table"
    assert mine["tokens"] == theirs["tokens"]
    torch.testing.assert_close(mine["logits"], theirs["logits"], rtol=0, atol=1e-5)
    assert mine["units"] == theirs["units"], "the boundaries closed the same segments"


@pytest.mark.parametrize("arm", PLACES)
def test_a_choice_the_table_does_not_hold_is_the_daemons(tiny_llama, runs, arm, monkeypatch, tmp_path):  # noqa: F811
    """A worker whose state is wrong (it claims a column past the filled ones): the daemon
    chooses itself, says so in its log, and the decode is the daemon's."""
    choose = WorkerTable.choose

    def wrong(self, query, state, evicting=None):
        choose(self, query, state, evicting)
        self.chosen_meta[1].fill_(state.units + 1)

    monkeypatch.setattr(WorkerTable, "choose", wrong)
    log = tmp_path / "daemon.log"
    out = decode_arm(tiny_llama, ARMS[arm], host_pool_gb=0.5, device_pool_gb=0.25, log_path=str(log))
    assert "the daemon chooses" in log.read_text()
    assert out[False]["tokens"] == runs["daemon", False][False]["tokens"]
    torch.testing.assert_close(out[False]["logits"], runs["daemon", False][False]["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arm", PLACES)
def test_positions_outside_the_host_tier_are_placed_as_none(tiny_llama, arm, monkeypatch):  # noqa: F811
    """A worker's bug writes positions past its sequence into its choice: the daemon places none
    of them (they would read pages never written), and every working set holds only positions
    before its sequence's end."""
    from kvrecall.engine import Engine

    choose = WorkerTable.choose

    def corrupt(self, query, state, evicting=None):
        choose(self, query, state, evicting)
        self.chosen[:, :3] = torch.tensor([10_000, 400, 399])  # past the tokens (< max_tokens 512: pages exist)

    seen = []
    switch_back = Engine._switch_back

    def watched(self, seq):
        waited = switch_back(self, seq)
        core = seq.session.core
        seen.append(int(core.slot_pos.max()) < core.position)
        return waited

    monkeypatch.setattr(WorkerTable, "choose", corrupt)
    monkeypatch.setattr(Engine, "_switch_back", watched)
    out = decode_arm(tiny_llama, ARMS[arm], host_pool_gb=0.5, device_pool_gb=0.25)
    assert out["worker_choices"][LABEL[arm]] > 0 and seen and all(seen)


def test_the_first_session_of_its_shapes_warms_the_choice_once(tiny_llama, monkeypatch):  # noqa: F811
    """Engine.add runs the choice's kernels once per shape (Triton compiles at first use: at the
    add, not at a first crossing), with and without an open segment; a second session of the same
    shapes runs nothing."""
    from kvrecall.client.hf import spec_for
    from kvrecall.engine import DecoderWeights, Engine

    calls = []
    choose = WorkerTable.choose
    monkeypatch.setattr(WorkerTable, "choose", lambda self, *args: calls.append(args[1]) or choose(self, *args))
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={**ARMS["worker"], "KVRECALL_WORKER_COPY_SHARE": "1"}) as d:
        with KVRecallClient(d.target, "warm") as client:
            engine = Engine(DecoderWeights.from_hf(tiny_llama), batch=2, max_capacity=1024, lag=2)
            g = torch.Generator().manual_seed(2)
            sessions = [client.open_session(spec_for(tiny_llama, max_tokens=512), "louiskv", CONFIG) for _ in range(2)]
            for session in sessions:
                engine.add(session, torch.randint(0, 128, (200,), generator=g))
            assert [state.evicted for state in calls] == [0, 16] and len(engine._warmed_choices) == 1
            engine.close()
            for session in sessions:
                session.close()
