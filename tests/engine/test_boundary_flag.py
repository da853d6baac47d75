"""The in-step boundary flag (engine/sessions.py) against the worker-side rule (BoundaryDetector)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.engine.sessions import SessionBatch
from kvrecall.v1 import kvrecall_pb2 as pb


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_device_flag_equals_the_worker_rule(device):
    """SessionBatch's in-step flag against BoundaryDetector (mean over heads, then layers)."""
    torch.manual_seed(5)
    B, L, Hq, H, D = 4, 3, 8, 2, 64
    batch = SessionBatch(B, L, Hq, H, D, 256, torch.device(device), torch.float32, D**-0.5, impl="reference")
    reference = torch.randn(B, L, Hq, D, device=device)
    batch.reference.copy_(reference)
    thresholds = [0.2, 0.5, 0.9, -2.0]
    batch.threshold.copy_(torch.tensor(thresholds, device=device))
    queries = [reference[:, layer] + 0.9 * torch.randn(B, Hq, D, device=device) for layer in range(L)]
    k = torch.randn(B, H, D, device=device)
    for layer, q in enumerate(queries):
        batch.attend(layer, q, k, k, torch.zeros(B, dtype=torch.int64, device=device))
    flags = batch.flags.tolist()
    assert any(flags) and not all(flags), "the case must cross on some slots and not on others"
    for b in range(B):
        mode = pb.BOUNDARY_MODE_THRESHOLD if thresholds[b] > -1 else pb.BOUNDARY_MODE_NEVER
        detector = BoundaryDetector(mode, thresholds[b], L)
        for layer in range(L):
            detector.set_reference(layer, reference[b, layer])
            detector.observe(layer, queries[layer][b])
        assert flags[b] == detector.is_boundary(), (b, detector.score())


B, L, Hq, H, D = 4, 2, 4, 2, 32  # the per-slot rule tests below


def _slots_and_detectors(device, seed: int, threshold: float, **rule: list):
    """A SessionBatch of B slots and a BoundaryDetector per slot, both at `threshold` with the
    same random references; rule: one detector field (target_rate / min_gap) given per slot,
    set on the batch's tensor of that name too. Returns (batch, reference, detectors, k)."""
    torch.manual_seed(seed)
    batch = SessionBatch(B, L, Hq, H, D, 128, torch.device(device), torch.float32, D**-0.5, impl="reference")
    reference = torch.randn(B, L, Hq, D, device=device)
    batch.reference.copy_(reference)
    batch.threshold.fill_(threshold)
    ((name, values),) = rule.items()
    getattr(batch, name).copy_(torch.tensor(values, dtype=getattr(batch, name).dtype, device=device))
    detectors = [BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, threshold, L, **{name: value}) for value in values]
    for b, detector in enumerate(detectors):
        for layer in range(L):
            detector.set_reference(layer, reference[b, layer])
    return batch, reference, detectors, torch.randn(B, H, D, device=device)


def _step(batch, detectors, reference, k, noise: float) -> list[bool]:
    """One decode step of random queries `noise` away from the references, on the batch and on
    every detector; returns the detectors' decisions."""
    device = reference.device
    queries = [reference[:, layer] + noise * torch.randn(B, Hq, D, device=device) for layer in range(L)]
    for layer, q in enumerate(queries):
        batch.attend(layer, q, k, k, torch.zeros(B, dtype=torch.int64, device=device))
    decisions = []
    for b, detector in enumerate(detectors):
        for layer in range(L):
            detector.observe(layer, queries[layer][b])
        decisions.append(detector.is_boundary())
    return decisions


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_target_rate_thresholds_move_per_slot_like_the_worker_rule(device):
    """Slots with a target rate move their threshold after each step exactly as
    BoundaryDetector does; slots without keep theirs."""
    batch, reference, detectors, k = _slots_and_detectors(device, 6, 0.3, target_rate=[0.1, 0.0, 0.3, 0.5])
    for _ in range(12):
        decisions = _step(batch, detectors, reference, k, 1.2)
        for b, detector in enumerate(detectors):
            assert bool(batch.flags[b]) == decisions[b]
            assert float(batch.threshold[b]) == pytest.approx(detector.threshold, abs=1e-5)
    assert float(batch.threshold[1]) == pytest.approx(0.3)
    assert len({round(float(t), 4) for t in batch.threshold}) > 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_min_gap_silences_slots_like_the_worker_rule(device):
    """Slots with a min_gap raise no flag in the steps after a retrieval (the flag's own, or a
    reference set between steps), exactly as BoundaryDetector decides."""
    batch, reference, detectors, k = _slots_and_detectors(device, 7, 0.5, min_gap=[0, 1, 2, 5])
    fired = [0] * B
    for step in range(14):
        if step == 7:  # a retrieval outside the rule on slot 3 (as a chunk's): both restart the count
            batch.set_reference(3, reference[3])
            detectors[3].note_retrieval()
        decisions = _step(batch, detectors, reference, k, 2.0)
        for b in range(B):
            assert bool(batch.flags[b]) == decisions[b], (step, b)
            fired[b] += decisions[b]
    assert fired[0] > fired[3] > 0
