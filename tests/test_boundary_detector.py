"""BoundaryDetector on its own: the threshold test, the reference reset, the per-layer
aggregate, and the two signals (the attention's post-RoPE query, or with RoPE undone)."""

from __future__ import annotations

import math

import pytest
import torch

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.v1 import kvrecall_pb2 as pb

D = 8


def at_angle(degrees: float) -> torch.Tensor:
    """A unit query [1, D] at `degrees` from e0 in the (e0, e1) plane: its cosine with e0."""
    q = torch.zeros(1, D)
    q[0, 0], q[0, 1] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return q


def cos_of(similarity: float) -> torch.Tensor:
    return at_angle(math.degrees(math.acos(similarity)))


def threshold_detector(num_layers: int = 1, threshold: float = 0.75, aggregate: str = "mean") -> BoundaryDetector:
    detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, threshold, num_layers, aggregate)
    for layer in range(num_layers):
        detector.set_reference(layer, at_angle(0))
    return detector


def test_fires_only_when_the_similarity_falls_below_the_threshold():
    detector = threshold_detector()
    for similarity, fires in ((1.0, False), (0.8, False), (0.76, False), (0.74, True), (0.7, True), (0.0, True)):
        detector.observe(0, cos_of(similarity))
        assert detector.score() == pytest.approx(similarity, abs=1e-5)
        assert detector.is_boundary() == fires, similarity


def test_scale_does_not_matter_and_a_layer_without_reference_reads_minus_one():
    detector = threshold_detector()
    detector.observe(0, 100.0 * at_angle(0))
    assert detector.score() == pytest.approx(1.0)
    fresh = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1)
    fresh.observe(0, at_angle(0))
    assert fresh.score() == -1.0 and fresh.is_boundary()


def test_the_reference_resets_to_the_query_of_the_retrieval():
    detector = threshold_detector()
    drifted = at_angle(60)  # cosine 0.5 with the first reference
    detector.observe(0, drifted)
    assert detector.is_boundary()
    detector.set_reference(0, drifted)  # the retrieval made for it
    detector.observe(0, drifted)
    assert detector.score() == pytest.approx(1.0) and not detector.is_boundary()
    detector.observe(0, at_angle(30))  # 30 degrees from the new reference, 30 from the old one
    assert detector.score() == pytest.approx(math.cos(math.radians(30)), abs=1e-6)


def test_the_reference_is_a_copy():
    detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1)
    query = at_angle(0)
    detector.set_reference(0, query)
    query[0, 0], query[0, 1] = 0.0, 1.0  # the worker overwrites its buffer in place
    detector.observe(0, at_angle(0))
    assert detector.score() == pytest.approx(1.0)


def test_heads_are_averaged_within_a_layer():
    detector = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1)
    detector.set_reference(0, torch.cat((at_angle(0), at_angle(0))))  # [Hq=2, D]
    detector.observe(0, torch.cat((at_angle(0), at_angle(90))))  # cosines 1 and 0
    assert detector.score() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("aggregate", "threshold", "score", "fires"),
    [("mean", 0.75, 0.7, True), ("mean", 0.6, 0.7, False), ("min", 0.6, 0.4, True), ("min", 0.3, 0.4, False)],
)
def test_layers_aggregate_by_mean_or_min(aggregate, threshold, score, fires):
    detector = threshold_detector(num_layers=2, threshold=threshold, aggregate=aggregate)
    detector.observe(0, cos_of(1.0))
    detector.observe(1, cos_of(0.4))
    assert detector.similarity == pytest.approx([1.0, 0.4], abs=1e-5)
    assert detector.score() == pytest.approx(score, abs=1e-5)
    assert detector.is_boundary() == fires


def test_modes_every_step_and_never_ignore_the_similarity():
    every = BoundaryDetector(pb.BOUNDARY_MODE_EVERY_STEP, 0.75, 1)
    never = BoundaryDetector(pb.BOUNDARY_MODE_NEVER, 0.75, 1)
    for detector in (every, never):
        detector.set_reference(0, at_angle(0))
        detector.observe(0, at_angle(0))
    assert every.is_boundary() and not never.is_boundary()
    with pytest.raises(ValueError, match="aggregate"):
        BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1, aggregate="max")


def test_pre_rope_signal_sees_the_query_and_not_its_position():
    """One query at two positions: after RoPE the cosine falls with the distance alone (the
    post-RoPE signal fires), with RoPE undone (hf.undo_rope) it stays 1 (the pre-RoPE one does not)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kvrecall.client.hf import undo_rope

    config = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, head_dim=D, max_position_embeddings=4096)
    rotary = LlamaRotaryEmbedding(config)
    query = torch.randn(1, 3, 1, D, generator=torch.Generator().manual_seed(0))  # [1, Hq, 1, D]

    def rotated(position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = rotary(query, torch.tensor([[position]]))
        q, _ = apply_rotary_pos_emb(query, query, cos, sin)
        return q[0, :, 0], cos[0, 0], sin[0, 0]  # [Hq, D], [D], [D]

    q_early, cos_early, sin_early = rotated(10)
    q_late, cos_late, sin_late = rotated(1500)
    torch.testing.assert_close(undo_rope(q_late, cos_late, sin_late), query[0, :, 0], rtol=1e-5, atol=1e-5)

    post = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1)
    post.set_reference(0, q_early)
    post.observe(0, q_late)
    pre = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.75, 1)
    pre.set_reference(0, undo_rope(q_early, cos_early, sin_early))
    pre.observe(0, undo_rope(q_late, cos_late, sin_late))
    assert post.score() < 0.75 and post.is_boundary()
    assert pre.score() == pytest.approx(1.0, abs=1e-5) and not pre.is_boundary()
