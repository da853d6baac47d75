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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_target_rate_thresholds_move_per_slot_like_the_worker_rule(device):
    """Slots with a target rate move their threshold after each step exactly as
    BoundaryDetector does; slots without keep theirs."""
    torch.manual_seed(6)
    B, L, Hq, H, D = 4, 2, 4, 2, 32
    batch = SessionBatch(B, L, Hq, H, D, 128, torch.device(device), torch.float32, D**-0.5, impl="reference")
    reference = torch.randn(B, L, Hq, D, device=device)
    batch.reference.copy_(reference)
    rates = [0.1, 0.0, 0.3, 0.5]
    batch.threshold.fill_(0.3)
    batch.target_rate.copy_(torch.tensor(rates, device=device))
    detectors = [BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.3, L, target_rate=r) for r in rates]
    for b, detector in enumerate(detectors):
        for layer in range(L):
            detector.set_reference(layer, reference[b, layer])
    k = torch.randn(B, H, D, device=device)
    for _ in range(12):
        queries = [reference[:, layer] + 1.2 * torch.randn(B, Hq, D, device=device) for layer in range(L)]
        for layer, q in enumerate(queries):
            batch.attend(layer, q, k, k, torch.zeros(B, dtype=torch.int64, device=device))
        for b, detector in enumerate(detectors):
            for layer in range(L):
                detector.observe(layer, queries[layer][b])
            assert bool(batch.flags[b]) == detector.is_boundary()
            assert float(batch.threshold[b]) == pytest.approx(detector.threshold, abs=1e-5)
    assert float(batch.threshold[1]) == pytest.approx(0.3)
    assert len({round(float(t), 4) for t in batch.threshold}) > 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_min_gap_silences_slots_like_the_worker_rule(device):
    """Slots with a min_gap raise no flag in the steps after a retrieval (the flag's own, or a
    reference set between steps), exactly as BoundaryDetector decides."""
    torch.manual_seed(7)
    B, L, Hq, H, D = 4, 2, 4, 2, 32
    batch = SessionBatch(B, L, Hq, H, D, 128, torch.device(device), torch.float32, D**-0.5, impl="reference")
    reference = torch.randn(B, L, Hq, D, device=device)
    batch.reference.copy_(reference)
    gaps = [0, 1, 2, 5]
    batch.threshold.fill_(0.5)
    batch.min_gap.copy_(torch.tensor(gaps, dtype=torch.int32, device=device))
    detectors = [BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.5, L, min_gap=g) for g in gaps]
    for b, detector in enumerate(detectors):
        for layer in range(L):
            detector.set_reference(layer, reference[b, layer])
    k = torch.randn(B, H, D, device=device)
    fired = [0] * B
    for step in range(14):
        if step == 7:  # a retrieval outside the rule on slot 3 (as a chunk's): both restart the count
            batch.set_reference(3, reference[3])
            detectors[3].note_retrieval()
        queries = [reference[:, layer] + 2.0 * torch.randn(B, Hq, D, device=device) for layer in range(L)]
        for layer, q in enumerate(queries):
            batch.attend(layer, q, k, k, torch.zeros(B, dtype=torch.int64, device=device))
        for b, detector in enumerate(detectors):
            for layer in range(L):
                detector.observe(layer, queries[layer][b])
            decided = detector.is_boundary()
            assert bool(batch.flags[b]) == decided, (step, b)
            fired[b] += decided
    assert fired[0] > fired[3] > 0
