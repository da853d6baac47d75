"""`kvrecall serve --session-ops inline`: appends and boundaries on the event loop give the same
working sets as the default worker-thread mode (real daemons, real gRPC)."""

from __future__ import annotations

import pytest

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from tests.conftest import SMALL, pool_used, random_kv, random_query
from tests.integration.test_sessions import POLICIES, check_contents, decode_steps


@pytest.fixture(scope="module")
def inline_daemon():
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.5, extra_args=["--session-ops", "inline"]) as d:
        yield d


@pytest.mark.parametrize("policy,config", [p for p in POLICIES if p[0] in ("louiskv", "quest")])
def test_inline_ops_keep_the_same_tokens_as_threaded_ops(daemon, inline_daemon, policy, config):
    total, prompt = 260, 180
    kv = random_kv(SMALL, total, seed=5)
    queries = random_query(SMALL, 3, 16)
    resident = []
    for target in (daemon.target, inline_daemon.target):
        with KVRecallClient(target, "inline-test") as client:
            before = pool_used(client)
            with client.open_session(SMALL, policy, config) as session:
                session.ingest(kv[:, :, :, :prompt].contiguous(), queries[:, :, -max(1, session.observation) :])
                decode_steps(session, kv, prompt, total - prompt)  # appends only: deterministic
                session.query.copy_(queries[:, :, 0])
                session.boundary()
                session.flush()
                check_contents(session, kv)
                resident.append(session.slot_pos.clone())
                assert session.stats().tokens == total
            assert pool_used(client) == before
    assert (resident[0] == resident[1]).all()


def test_bad_session_ops_setting_is_refused():
    with pytest.raises(RuntimeError, match="--session-ops"):
        with LocalDaemon(extra_args=["--session-ops", "threads"]):
            pass
    with pytest.raises(RuntimeError, match="KVRECALL_SESSION_OPS: Input should be 'thread' or 'inline'"):
        with LocalDaemon(env={"KVRECALL_SESSION_OPS": "threads"}):
            pass
