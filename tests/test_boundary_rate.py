"""The boundary rules of BoundaryDetector: the fixed threshold unchanged, and the target
retrieval rate held on synthetic similarity streams (no model, no daemon)."""

from __future__ import annotations

import random

import pytest
import torch

from kvrecall.client.boundary import RATE_STEP, BoundaryDetector, next_threshold
from kvrecall.v1 import kvrecall_pb2 as pb


class _Stream:
    """A session's signal: the query drifts away from the last retrieval's reference at a
    random speed, so the similarity falls until a boundary resets it (like LouisKV's)."""

    def __init__(self, seed: int, floor: float) -> None:
        self.rng = random.Random(seed)
        self.floor = floor  # the model's typical similarity scale
        self.since = 0

    def next(self) -> float:
        self.since += 1
        return max(-1.0, 1.0 - (1.0 - self.floor) * (1 - 0.8**self.since) + self.rng.gauss(0, 0.02))

    def retrieved(self) -> None:
        self.since = 0


def _run(detector: BoundaryDetector, stream: _Stream, steps: int) -> float:
    fired = 0
    for _ in range(steps):
        detector.similarity = [stream.next()] * detector.num_layers
        if detector.is_boundary():
            fired += 1
            stream.retrieved()
    return fired / steps


@pytest.mark.parametrize("floor", [0.95, 0.6, 0.2])  # models whose signal lives at different scales
@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_target_rate_is_held_on_any_similarity_scale(floor, rate):
    detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 4, target_rate=rate)
    got = _run(detector, _Stream(seed=int(floor * 100), floor=floor), 4000)
    assert abs(got - rate) <= 0.02, (floor, rate, got, detector.threshold)


def test_fixed_threshold_is_unchanged():
    """target_rate 0: the rule is the plain threshold, which fires on 0% or nearly every step
    depending on the model's scale (why the rate rule exists)."""
    rates = []
    for floor in (0.95, 0.2):
        detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 4)
        stream = _Stream(seed=1, floor=floor)
        for _ in range(200):
            s = stream.next()
            detector.similarity = [s] * 4
            assert detector.is_boundary() == (s < 0.75)
            if s < 0.75:
                stream.retrieved()
        assert detector.threshold == 0.75
        rates.append(_run(detector, _Stream(seed=2, floor=floor), 1000))
    assert rates[0] == 0.0 and rates[1] > 0.3


def test_next_threshold_per_slot_tensor_matches_the_scalar_rule():
    threshold = torch.tensor([0.75, 0.75, 0.5])
    fired = torch.tensor([1.0, 0.0, 1.0])
    rate = torch.tensor([0.1, 0.1, 0.0])  # the last slot: fixed threshold
    got = next_threshold(threshold, fired, rate)
    assert torch.allclose(got, torch.tensor([0.75 - RATE_STEP * 0.9, 0.75 + RATE_STEP * 0.1, 0.5]))
    assert next_threshold(0.75, True, 0.1) == pytest.approx(float(got[0]))
    assert next_threshold(0.75, True, 0.0) == 0.75


def test_target_rate_range():
    with pytest.raises(ValueError, match="target_rate"):
        BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 4, target_rate=1.0)


def test_louiskv_target_rate_reaches_the_workers_detector(client):
    from kvrecall.client import InvalidArgumentError
    from kvrecall.client.core import ModelSpec
    from kvrecall.client.hf import KVRecallCache

    spec = ModelSpec(num_layers=2, num_kv_heads=1, num_query_heads=2, head_dim=16, dtype=torch.float32, max_tokens=256)
    base = {"budget": 32, "n_sink": 4, "window": 32}
    with client.open_session(spec, "louiskv", {**base, "target_rate": 0.15}) as session:
        assert session.boundary_target_rate == pytest.approx(0.15)
        assert KVRecallCache(session).detector.target_rate == pytest.approx(0.15)
    with client.open_session(spec, "louiskv", base) as session:
        assert session.boundary_target_rate == 0.0 and session.boundary_threshold == pytest.approx(0.75)
    with pytest.raises(InvalidArgumentError, match="target_rate"):
        client.open_session(spec, "louiskv", {**base, "target_rate": 1.0})


@pytest.mark.parametrize("gap", [0, 1, 3])
def test_min_gap_keeps_the_rule_quiet_after_any_retrieval(gap):
    """A signal always below the threshold fires at every step without a gap, and once every
    gap + 1 steps with one; a retrieval outside the rule (a chunk's) restarts the count."""
    detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 2, min_gap=gap)
    detector.similarity = [0.1, 0.1]
    fired = [detector.is_boundary() for _ in range(12)]
    assert fired == [(step + 1) % (gap + 1) == 0 for step in range(12)]
    detector.note_retrieval()
    after = [detector.is_boundary() for _ in range(gap + 1)]
    assert after == [False] * gap + [True]


def test_min_gap_range():
    with pytest.raises(ValueError, match="min_gap"):
        BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 4, min_gap=-1)


def test_louiskv_min_gap_reaches_the_workers_detector(client):
    from kvrecall.client import InvalidArgumentError
    from kvrecall.client.core import ModelSpec
    from kvrecall.client.hf import KVRecallCache

    spec = ModelSpec(num_layers=2, num_kv_heads=1, num_query_heads=2, head_dim=16, dtype=torch.float32, max_tokens=256)
    base = {"budget": 32, "n_sink": 4, "window": 32}
    with client.open_session(spec, "louiskv", {**base, "min_gap": 4}) as session:
        assert session.boundary_min_gap == 4
        assert KVRecallCache(session).detector.min_gap == 4
    with client.open_session(spec, "louiskv", base) as session:
        assert session.boundary_min_gap == 8  # the default (docs/TUNING.md)
    with client.open_session(spec, "louiskv", {**base, "min_gap": 0}) as session:
        assert session.boundary_min_gap == 0
    with pytest.raises(InvalidArgumentError, match="min_gap"):
        client.open_session(spec, "louiskv", {**base, "min_gap": 1 << 17})
