"""Pieces of the tensor-parallel worker on their own: sharding, the agreed boundary signal,
and the daemon's handling of the rank (real daemon, real gRPC)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvrecall.client.boundary import BoundaryDetector
from kvrecall.client.errors import InvalidArgumentError
from kvrecall.tp import AgreedBoundaryDetector, TPGroup, TPLlama, TPShape
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.conftest import SMALL

CONFIG = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=128,
)


def test_shape_splits_heads_and_mlp_rows_per_rank():
    config = LlamaConfig(**CONFIG)
    shapes = [TPShape.of(config, TPGroup(rank, 2)) for rank in range(2)]
    assert [(s.num_query_heads, s.num_kv_heads, s.intermediate) for s in shapes] == [(2, 1, 48)] * 2
    assert [s.q_rows for s in shapes] == [(0, 32), (32, 64)]
    assert [s.kv_rows for s in shapes] == [(0, 16), (16, 32)]
    assert [s.mlp_rows for s in shapes] == [(0, 48), (48, 96)]
    spec = shapes[1].spec(100, torch.float32)
    assert (spec.num_kv_heads, spec.num_query_heads, spec.head_dim) == (1, 2, 16)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 48}, "num_attention_heads"),
        ({"intermediate_size": 97}, "intermediate_size"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_shape_refuses_what_does_not_split(change, field):
    with pytest.raises(ValueError, match=field):
        TPShape.of(LlamaConfig(**{**CONFIG, **change}), TPGroup(0, 2))


def test_group_refuses_a_rank_outside_it():
    with pytest.raises(ValueError, match="rank"):
        TPGroup(2, 2)


def test_one_rank_shard_is_the_whole_model():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    ids = torch.randint(0, 128, (1, 9))
    tp = TPLlama.from_hf(hf, TPGroup.single())
    with torch.no_grad():
        expected = hf(ids).logits[0, -1]
        got = tp(ids, 0, DynamicCache())  # plain causal attention when no KVRecallCache drives it
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


class _Pair:
    """Stands in for a two-rank group inside one process: gather returns both ranks' tables."""

    def __init__(self) -> None:
        self.detectors: list[AgreedBoundaryDetector] = []

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.stack([d.local for d in self.detectors])


def test_agreed_signal_equals_the_single_gpu_signal_over_all_heads():
    layers, heads, dim = 3, 8, 16
    g = torch.Generator().manual_seed(0)
    ref, now = torch.randn(layers, heads, dim, generator=g), torch.randn(layers, heads, dim, generator=g)
    now[1] = ref[1] + 0.1 * now[1]  # one layer barely moved
    single = BoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.5, layers)
    pair = _Pair()
    ranks = [AgreedBoundaryDetector(pb.BOUNDARY_MODE_THRESHOLD, 0.5, layers, group=pair) for _ in range(2)]
    pair.detectors = ranks
    half = heads // 2
    for layer in range(layers):
        single.set_reference(layer, ref[layer])
        single.observe(layer, now[layer])
        for rank, d in enumerate(ranks):
            mine = slice(rank * half, (rank + 1) * half)
            d.set_reference(layer, ref[layer, mine])
            d.observe(layer, now[layer, mine])
    for d in ranks:
        assert d.is_boundary() == single.is_boundary()
        assert d.similarity == pytest.approx(single.similarity, abs=1e-6)
        assert d.score() == pytest.approx(single.score(), abs=1e-6)
        assert d.agreements == 1
    assert ranks[0].similarity == ranks[1].similarity  # bit-identical on every rank
    # each rank alone would have seen something else
    alone = [float(d.local[1, 0] / d.local[1, 1]) for d in ranks]
    assert alone[0] != alone[1]


def test_daemon_refuses_a_rank_outside_the_group(client):
    with pytest.raises(InvalidArgumentError, match="tp_rank"):
        client.open_session(SMALL, "full", tp_rank=2, tp_size=2)
    with pytest.raises(InvalidArgumentError, match="tp_rank"):
        client.open_session(SMALL, "full", tp_rank=1, tp_size=0)


def test_daemon_shows_the_rank_in_stats(client):
    with client.open_session(SMALL, "full", tp_rank=1, tp_size=2, tag="tp") as session:
        stats = session.stats()
        assert (stats.tp_rank, stats.tp_size) == (1, 2)
    with client.open_session(SMALL, "full") as session:
        assert (session.stats().tp_rank, session.stats().tp_size) == (0, 0)
