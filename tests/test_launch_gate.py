"""The launch gate's host side (kvrecall/launch_gate.py): the value a gate waits for, opening it,
the watchdog that opens a gate nobody released, and that a CPU daemon never gates. The stream
wait itself needs a GPU (tests/gpu/test_launch_gate_gpu.py)."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from kvrecall import launch_gate


class RecordingDriver:
    """The two driver entry points, recording what the gate asked for (no GPU here)."""

    def __init__(self) -> None:
        self.waits: list[tuple[int, int, int]] = []

    def device_pointer(self, pointer, host, flags) -> int:
        pointer._obj.value = 4096
        return 0

    def wait(self, stream, address, value, flags) -> int:
        self.waits.append((address, value, flags))
        return 0


class FakeStream:
    cuda_stream = 7


def test_a_gate_waits_for_the_next_value_and_opens_to_it():
    driver = RecordingDriver()
    gate = launch_gate.Gate(driver)
    assert gate.open() is False  # never closed
    gate.close(FakeStream())
    assert driver.waits == [(4096, 1, 0)]  # address from the driver, value 1, GEQ
    assert int(gate.word[0]) == 0
    assert gate.open() is True and int(gate.word[0]) == 1
    assert gate.open() is False
    gate.close(FakeStream())
    assert driver.waits[-1] == (4096, 2, 0)
    assert gate.open() is True and int(gate.word[0]) == 2


def test_the_watchdog_opens_a_gate_nobody_released(caplog):
    caplog.set_level(logging.WARNING, logger="kvrecall.launch_gate")  # whatever earlier tests set on "kvrecall"
    gate = launch_gate.Gate(RecordingDriver())
    before = launch_gate.STATS.timeouts
    gate.close(FakeStream())
    deadline = time.monotonic() + 2.0  # the watchdog's thread opens, counts, then logs: wait for all three
    while "watchdog opened it" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.005)
    assert int(gate.word[0]) == 1
    assert launch_gate.STATS.timeouts == before + 1
    assert "watchdog opened it" in caplog.text
    # a gate opened in time is left alone by its watchdog
    gate.close(FakeStream())
    assert gate.open() is True
    time.sleep(launch_gate.WATCHDOG_S * 3)
    assert launch_gate.STATS.timeouts == before + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_a_cpu_daemon_never_gates():
    launch_gate.configure(True)
    try:
        assert not launch_gate.enabled()
        with launch_gate.held(torch.device("cpu")):
            launch_gate.release()  # nothing to open
    finally:
        launch_gate.configure(False)


def test_a_gate_that_cannot_be_set_up_turns_itself_off_and_the_work_runs(monkeypatch, caplog):
    """Whatever setting a gate up raises (a driver refusing the wait, a device the binding cannot
    read: both seen on an H200), the retrieval runs ungated and the gate stays off after it."""
    caplog.set_level(logging.WARNING, logger="kvrecall.launch_gate")

    def refuse(device):
        raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")

    monkeypatch.setattr(launch_gate, "_gate", refuse)
    monkeypatch.setattr(launch_gate, "_enabled", True)
    ran = []
    with launch_gate.held(torch.device("cuda")):
        ran.append(True)
        launch_gate.release()  # no gate was closed: nothing to open
    assert ran == [True]
    assert not launch_gate.enabled()
    assert "launch gate off" in caplog.text and "specified index" in caplog.text
