"""The launch gate on a GPU (kvrecall/launch_gate.py): work launched behind a closed gate does
not run until the host opens it; a sync nobody released is freed by the watchdog."""

from __future__ import annotations

import time

import pytest
import torch

from kvrecall import launch_gate

pytestmark = pytest.mark.gpu


@pytest.fixture
def gate_on():
    launch_gate.configure(True)
    assert launch_gate.enabled(), "the driver refused stream waits"
    yield
    launch_gate.configure(False)


def test_gated_work_runs_only_once_released(gate_on):
    device = torch.device("cuda")
    x = torch.zeros(1 << 20, device=device)
    x.add_(0)  # the kernel loaded (lazy module loading can outlast the watchdog's 20 ms)
    torch.cuda.synchronize()
    done = torch.cuda.Event()
    with launch_gate.held(device):
        x.add_(1)
        done.record()
        time.sleep(0.005)  # below the watchdog's 20 ms
        assert not done.query(), "the kernel ran before the gate opened"
        launch_gate.release()
        done.synchronize()
    assert float(x.sum()) == x.numel()


def test_a_gate_in_a_fresh_thread_binds_its_context(gate_on):
    """The daemon serves calls in worker threads that may not have touched CUDA yet."""
    import threading

    device = torch.device("cuda")
    x = torch.zeros(16, device=device)
    x.add_(0)
    torch.cuda.synchronize()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with launch_gate.held(device):
                x.add_(1)
                launch_gate.release()
            torch.cuda.current_stream(device).synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()
    assert not errors and launch_gate.enabled()
    assert float(x.sum()) == 16.0


def test_a_sync_inside_a_closed_gate_is_freed_by_the_watchdog(gate_on):
    device = torch.device("cuda")
    before = launch_gate.STATS.timeouts
    x = torch.zeros(16, device=device)
    started = time.perf_counter()
    with launch_gate.held(device):
        x.add_(2)
        total = float(x.sum())  # a host sync with the gate still closed
    waited = time.perf_counter() - started
    assert total == 32.0
    assert launch_gate.STATS.timeouts == before + 1
    assert waited >= launch_gate.WATCHDOG_S * 0.9
