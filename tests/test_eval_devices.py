"""Which device each eval worker gets (``kvrecall eval --device cuda --workers N``)."""

from __future__ import annotations

import pytest

from kvrecall.eval.harness import worker_devices


def test_workers_are_dealt_over_every_gpu():
    assert worker_devices("cuda", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_one_gpu_or_an_explicit_device_is_used_by_every_worker():
    assert worker_devices("cuda", 3, 1) == ["cuda"] * 3
    assert worker_devices("cuda:1", 2, 4) == ["cuda:1", "cuda:1"]
    assert worker_devices("cpu", 2, 0) == ["cpu", "cpu"]


def test_zero_workers_is_refused():
    with pytest.raises(ValueError, match="workers"):
        worker_devices("cuda", 0, 2)


def test_auto_workers_fill_the_gpus_within_the_cores():
    from kvrecall.eval.harness import auto_workers

    assert auto_workers("cpu", 0, 2) == 1
    assert auto_workers("cuda", 1, 16) == 8
    assert auto_workers("cuda", 2, 32) == 16
    assert auto_workers("cuda", 2, 8) == 4  # half the cores
    assert auto_workers("cuda:1", 0, 2) == 1
