"""masked_attention / attention_at_positions: decode attention over a working set is exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K

MakeTensor = Callable[..., torch.Tensor]


def sliced_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain softmax attention per query head over the kv head's valid slots, cut out by slicing."""
    num_kv_heads = keys.shape[0]
    group = query.shape[0] // num_kv_heads
    out = []
    for head in range(query.shape[0]):
        kv = head // group
        k, v = keys[kv][valid[kv]].double(), values[kv][valid[kv]].double()
        probs = torch.softmax(k @ query[head].double() * scale, dim=0)
        out.append(probs @ v)
    return torch.stack(out).float()


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "slots", "dim"), [(1, 1, 1, 4), (8, 2, 37, 16), (6, 6, 20, 8), (12, 4, 64, 32)]
)
def test_equals_attention_restricted_to_the_valid_slots(
    device: torch.device, randn: MakeTensor, q_heads: int, kv_heads: int, slots: int, dim: int
) -> None:
    query, keys, values = (
        randn(1, q_heads, dim),
        randn(2, kv_heads, slots, dim),
        randn(3, kv_heads, slots, dim),
    )
    generator = torch.Generator().manual_seed(4)
    valid = (torch.rand(kv_heads, slots, generator=generator) > 0.4).to(device)
    valid[:, 0] = True
    scale = dim**-0.5
    got = K.masked_attention(query, keys, values, valid, scale)
    torch.testing.assert_close(got, sliced_attention(query, keys, values, valid, scale), atol=1e-5, rtol=1e-5)


def test_half_precision_inputs_compute_in_float32(device: torch.device, randn: MakeTensor) -> None:
    query, keys, values = randn(1, 4, 8), randn(2, 2, 10, 8), randn(3, 2, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool, device=device)
    got = K.masked_attention(query.half(), keys.bfloat16(), values.half(), valid, 0.3)
    want = K.masked_attention(
        query.half().float(), keys.bfloat16().float(), values.half().float(), valid, 0.3
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_a_head_with_no_valid_slot_outputs_zeros(device: torch.device, randn: MakeTensor) -> None:
    valid = torch.ones(2, 5, dtype=torch.bool, device=device)
    valid[1] = False
    out = K.masked_attention(randn(1, 4, 8), randn(2, 2, 5, 8), randn(3, 2, 5, 8), valid, 0.3)
    assert out[2:].abs().max() == 0 and out[:2].abs().max() > 0


def test_a_working_set_equals_full_attention_at_its_positions(
    device: torch.device, randn: MakeTensor
) -> None:
    """The working-set contract: slots in any order, empty slots -1, same answer as full attention."""
    kv_heads, q_heads, tokens, dim, capacity = 2, 6, 50, 16, 24
    query, keys, values = (
        randn(1, q_heads, dim),
        randn(2, kv_heads, tokens, dim),
        randn(3, kv_heads, tokens, dim),
    )
    generator = torch.Generator().manual_seed(4)
    slot_pos = torch.full((kv_heads, capacity), -1, dtype=torch.int32)
    for head in range(kv_heads):  # per head: a different subset of positions, scattered over the slots
        chosen = torch.randperm(tokens, generator=generator)[:18]
        slot_pos[head, torch.randperm(capacity, generator=generator)[:18]] = chosen.int()
    slot_pos = slot_pos.to(device)
    heads = torch.arange(kv_heads, device=device).unsqueeze(1)
    ws_keys = torch.where((slot_pos >= 0)[..., None], keys[heads, slot_pos.long().clamp_min(0)], 0.0)
    ws_values = torch.where((slot_pos >= 0)[..., None], values[heads, slot_pos.long().clamp_min(0)], 0.0)
    scale = dim**-0.5
    got = K.masked_attention(query, ws_keys, ws_values, slot_pos >= 0, scale)
    want = K.attention_at_positions(query, keys, values, slot_pos, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    everything = torch.arange(tokens, device=device).expand(kv_heads, tokens)
    full = K.attention_at_positions(query, keys, values, everything, scale)
    assert (got - full).abs().max() > 1e-3  # a strict subset really changes the answer


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.masked_attention(
                torch.zeros(5, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.ones(2, 4, dtype=torch.bool, device=d),
                1.0,
            ),
            "query: 5 heads",
        ),
        (
            lambda d: K.masked_attention(
                torch.zeros(4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 5, 8, device=d),
                torch.ones(2, 4, dtype=torch.bool, device=d),
                1.0,
            ),
            "values: shape",
        ),
        (
            lambda d: K.masked_attention(
                torch.zeros(4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.ones(2, 3, dtype=torch.bool, device=d),
                1.0,
            ),
            "valid: shape",
        ),
        (
            lambda d: K.masked_attention(
                torch.zeros(4, 6, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.ones(2, 4, dtype=torch.bool, device=d),
                1.0,
            ),
            "query: dim 1",
        ),
        (
            lambda d: K.masked_attention(
                torch.zeros(4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.ones(2, 4, dtype=torch.bool, device=d),
                1.0,
                impl="triton",
            ),
            "no Triton kernel",
        ),
        (
            lambda d: K.attention_at_positions(
                torch.zeros(4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.zeros(2, 4, 8, device=d),
                torch.tensor([[0, 4], [1, 2]], device=d),
                1.0,
            ),
            "positions: max 4",
        ),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
