"""StepEvent.follows through a real daemon: a retrieval sent before the notice it follows has
been applied (a deferred-eviction worker does not take that answer first; the two calls may
even arrive the other way round) waits in the daemon for it and leaves the working set as the
two sent in turn; a notice that never comes fails the event after follow_wait_s, naming the
field, and the session carries on; a `follows` past the event's position is refused. The waits
and the failure show in the daemon's metrics."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
import torch

from kvrecall.client import FailedPreconditionError, InvalidArgumentError, KVRecallClient, StepCall
from kvrecall.local import LocalDaemon
from tests.conftest import random_kv, random_query
from tests.integration.test_boundaries_batch import SPEC, same_working_set, write_step
from tests.integration.test_quotas_metrics import free_port

CONFIG = {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8, "max_segment": 16}
PROMPT = 150


def open_deferred(client, seed: int = 3):
    session = client.open_session(SPEC, "louiskv", CONFIG, transport="shm", deferred_eviction=True)
    assert session.core.deferred
    session.ingest(random_kv(SPEC, PROMPT, seed), random_query(SPEC, seed + 1, max(1, session.observation)))
    return session


def write(session, kv: torch.Tensor, tokens: int, seed: int) -> None:
    """`tokens` decode steps' writes (K/V from `kv`, a fresh query each)."""
    for i in range(tokens):
        write_step(session, kv, random_query(SPEC, seed + i, 1)[:, :, 0])


WAIT_S = 2.0


@pytest.fixture(scope="module")
def impatient():
    """A daemon that waits at most WAIT_S for a notice an event follows, with its metrics served:
    (client, the metrics URL)."""
    port = free_port()
    with LocalDaemon(host_pool_gb=0.5, device_pool_gb=0.25, env={"KVRECALL_FOLLOW_WAIT_S": str(WAIT_S)},
                     extra_args=["--metrics-port", str(port)]) as d:  # fmt: skip
        with KVRecallClient(d.target, "test-worker", timeout=30.0) as c:
            yield c, f"http://127.0.0.1:{port}/metrics"


def metric(url: str, series: str) -> float:
    """One series' value from the daemon's /metrics (0 when it is not there yet)."""
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(rf"^{re.escape(series)} (\S+)$", body, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_retrieval_sent_before_its_notice_waits_for_it(impatient):
    """The retrieval (its notice riding along, past what the daemon would take before the
    notice it follows) is sent first and held; the notice then goes; both answer, the
    retrieval after the notice, and the working set equals a twin's that sent them in turn; the
    daemon counts the wait."""
    client, url = impatient
    waited = metric(url, "kvrecall_follow_wait_seconds_count")
    kv = random_kv(SPEC, 512, 11)
    held, twin = open_deferred(client), open_deferred(client)
    spill = held.spill_every
    for session in (held, twin):
        write(session, kv, spill, seed=100)
    upto = held.core.position
    for session in (held, twin):
        write(session, kv, 3, seed=200)  # the boundary's step: 3 tokens past the unanswered notice
    position = held.core.position
    twin_notice = client.boundaries([StepCall(twin, upto, notice=True)])
    twin_retrieval = client.boundaries([StepCall(twin, position, notice=True, retrieve=True)])

    retrieval = client.boundaries_future([StepCall(held, position, notice=True, retrieve=True, follows=upto)])
    time.sleep(0.3)
    assert not retrieval.done(), "the daemon did not hold the event for the notice it follows"
    notice = client.boundaries_future([StepCall(held, upto, notice=True)])
    first, second = notice.result(), retrieval.result()
    assert notice.answered <= retrieval.answered
    assert first.results[0].append.spilled_upto == upto == twin_notice.results[0].append.spilled_upto
    assert second.results[0].append.spilled_upto == position == held.core.noticed_upto
    assert second.results[0].retrieval.units_selected == twin_retrieval.results[0].retrieval.units_selected > 0
    assert same_working_set(held, twin), "the held retrieval did not follow its notice"
    assert metric(url, "kvrecall_follow_wait_seconds_count") == waited + 1
    assert metric(url, "kvrecall_follow_wait_seconds_sum") >= 0.2
    held.close()
    twin.close()


def test_follows_past_the_position_is_refused(client):
    session = open_deferred(client)
    write(session, random_kv(SPEC, 512, 5), 2, seed=7)
    position = session.core.position
    with pytest.raises(InvalidArgumentError, match=r"events\[0\]\.follows"):
        client.boundaries([StepCall(session, position, retrieve=True, follows=position + 1)])
    client.boundaries([StepCall(session, position, retrieve=True)])  # the session carries on
    session.close()


def test_a_notice_that_never_comes_fails_the_event_and_loses_nothing(impatient):
    client, url = impatient
    errors = 'kvrecall_errors_total{code="FAILED_PRECONDITION",method="Boundaries"}'
    failed = metric(url, errors)
    session = open_deferred(client)
    kv = random_kv(SPEC, 512, 9)
    write(session, kv, session.spill_every, seed=300)
    upto = session.core.position
    started = time.monotonic()
    with pytest.raises(FailedPreconditionError, match=r"events\[0\]\.follows: no notice up to"):
        client.boundaries([StepCall(session, upto, retrieve=True, follows=upto)])
    assert WAIT_S - 0.1 < time.monotonic() - started < WAIT_S + 10.0
    assert metric(url, errors) == failed + 1
    assert client.boundaries([StepCall(session, upto, notice=True)]).results[0].append.spilled_upto == upto
    answer = client.boundaries([StepCall(session, upto, retrieve=True, follows=upto)])  # applied: no wait
    assert answer.results[0].retrieval.units_selected > 0
    session.close()
