"""Which placements read the host tier by the copy engine: background ones (a Boundaries call the
worker does not wait for) under host_reads=copy, or auto up to AUTO_COPY_MAX_BYTES, in their own
thread only; every other one by the kernel's loads (the faster answer)."""

from __future__ import annotations

import threading

import pytest
import torch

from kvrecall import kernels
from kvrecall.kernels import placement
from kvrecall.server import step_batch
from kvrecall.server.layout import ModelLayout
from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.session import SessionRegistry
from kvrecall.v1 import kvrecall_pb2 as pb


@pytest.fixture
def host_reads():
    before = placement.HOST_READS
    yield kernels.set_host_reads
    kernels.set_host_reads(before)


def test_only_background_placements_of_this_thread_use_the_copy_engine(host_reads):
    host_reads("copy")
    assert not placement.copy_reads()
    seen_elsewhere = []
    with kernels.background_reads():
        assert placement.copy_reads()
        with kernels.background_reads():  # nested: still background, and restored after
            assert placement.copy_reads()
        assert placement.copy_reads()
        other = threading.Thread(target=lambda: seen_elsewhere.append(placement.copy_reads()))
        other.start()
        other.join()
    assert seen_elsewhere == [False]
    assert not placement.copy_reads()
    host_reads("kernel")
    with kernels.background_reads():
        assert not placement.copy_reads()
    with pytest.raises(ValueError, match="host_reads"):
        host_reads("dma")


def test_auto_copies_small_background_placements_and_leaves_large_ones_to_the_kernel(host_reads):
    assert placement.HOST_READS == "auto"  # the default
    limit = placement.AUTO_COPY_MAX_BYTES
    assert not placement.copy_reads(1)  # not background
    with kernels.background_reads():
        assert placement.copy_reads(limit)
        assert not placement.copy_reads(limit + 1)
    host_reads("copy")
    with kernels.background_reads():
        assert placement.copy_reads(limit + 1)
    host_reads("kernel")
    with kernels.background_reads():
        assert not placement.copy_reads(1)


@pytest.mark.parametrize("background", [False, True])
def test_a_boundaries_call_places_in_the_background_only_when_asked(host_reads, monkeypatch, background):
    """serve_step places a call's retrievals inside background_reads exactly when the request
    says background (the engine's lagged retrievals); its notices never."""
    host_reads("copy")
    layout = ModelLayout(2, 2, 4, 16, torch.float32, max_tokens=512)
    host = HostPool(8 << 20, page_bytes=256 * 1024)
    registry = SessionRegistry(host, DevicePool(64 << 20, torch.device("cpu")), 600.0)
    session = registry.open("t", layout, LouisKVPolicy(LouisKVConfig(budget=32), layout), pb.TRANSPORT_SHM, 600.0, "x")
    try:
        session.ingest(0, torch.randn(2, 2, 2, 300, 16), torch.randn(2, 4, 1, 16))
        seen = []
        real = step_batch._place

        def place(*args):
            seen.append(placement.copy_reads())
            return real(*args)

        monkeypatch.setattr(step_batch, "_place", place)
        event = pb.StepEvent(session_id=session.session_id, position=300, retrieve=True)
        step_batch.serve_step([session], [event], background)
        assert seen == [background]
        assert not placement.copy_reads()  # the scope ends with the call
    finally:
        registry.close(session)
        host.close()


def test_forced_copy_reads_override_the_setting_inside_their_block_only(host_reads):
    """Worker copies of a session that stages every row force the copy engine's reads (the daemon
    promised it writes no row in place) whatever host_reads says and however much can move; the
    force ends with its block and never makes a foreground placement a background one."""
    host_reads("kernel")
    with kernels.background_reads():
        assert not placement.copy_reads()
        with kernels.background_reads(force_copy=True):
            assert placement.copy_reads(most_bytes=placement.AUTO_COPY_MAX_BYTES * 4)
        assert not placement.copy_reads(), "the force outlived its block"
    assert not placement.copy_reads()


def test_no_placement_is_always_staged_without_a_gpu_kernel():
    """always_staged (WorkingSetInfo.stages_every_row) holds only where the Triton kernel runs on
    the working set's GPU: on CPU tensors the reference places (rows in place), so never."""
    keys = torch.zeros(4, 8, 16)
    assert not kernels.always_staged(keys, torch.zeros(16 * 100), 4)
    assert not kernels.always_staged(keys, torch.zeros(16 * 100), 0)
