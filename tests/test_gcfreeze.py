"""kvrecall.gcfreeze: what it freezes, and that a frozen block gives its objects back; a daemon
process freezes its startup once it serves (gc_freeze, on by default) and says so in its log,
and says nothing of it with gc_freeze off; an embedded daemon leaves it to its process's owner."""

from __future__ import annotations

import gc

from kvrecall import gcfreeze
from kvrecall.local import LocalDaemon
from kvrecall.server.embedded import EmbeddedDaemon


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_freeze_takes_what_is_alive_and_frozen_gives_it_back():
    gc.unfreeze()
    alive = _Node()
    assert gcfreeze.freeze() > 0 and gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())  # out of the collector's generations
    gc.unfreeze()
    assert any(o is alive for o in gc.get_objects())
    with gcfreeze.frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with gcfreeze.frozen(enabled=False):
        assert gc.get_freeze_count() == 0


def test_a_daemon_freezes_once_it_serves_unless_told_not_to():
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.25) as daemon:
        log = daemon.log()  # (a clean stop removes it)
    assert "objects of startup frozen" in log and "serving on" in log
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.25, env={"KVRECALL_GC_FREEZE": "0"}) as daemon:
        log = daemon.log()
    assert "objects of startup frozen" not in log and "serving on" in log


def test_an_embedded_daemon_leaves_the_freeze_to_its_process():
    gc.unfreeze()
    with EmbeddedDaemon(host_pool_gb=0.25, device_pool_gb=0.25) as daemon:
        assert daemon.config.gc_freeze is False
        assert gc.get_freeze_count() == 0


def test_pauses_counts_the_collectors_passes_while_active():
    with gcfreeze.Pauses() as pauses:
        gc.collect(0)
        gc.collect()
    gc.collect()  # after: not counted
    summary = pauses.summary()
    assert summary["gc_collections"][0] >= 1 and summary["gc_collections"][2] >= 1
    assert summary["gc_collections"][2] == 1 and summary["gc_full_ms_total"] > 0
    assert summary["gc_pause_ms_max"] >= summary["gc_full_ms_total"]  # the one full pass is among the passes
