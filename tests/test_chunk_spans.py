"""louiskv's chunk_span: a chunk's best-voted tokens bring their neighbours (with_spans), on
hand-made rows and against a plain-Python reference on random ones."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server.policies.louiskv import LouisKVConfig, with_spans


def test_a_seed_brings_its_neighbours_in_its_place():
    top = torch.tensor([[50, 10, 30, 31, 99, 0]])
    assert with_spans(top, 1, 2, (0, 100)).tolist() == [[50, 49, 51, 48, 52, 10]]  # nearest first
    # the second seed's span follows the first's; the budget ends inside it, after the seed itself
    assert with_spans(top, 2, 2, (0, 100)).tolist() == [[50, 49, 51, 48, 52, 10]]
    assert with_spans(top, 1, 4, (0, 100))[0, 0].item() == 50  # a span wider than the budget keeps its seed


def test_spans_stay_inside_the_voted_range_and_name_each_token_once():
    top = torch.tensor([[16, 17, 40, 90], [95, 94, 20, 60]])
    out = with_spans(top, 2, 3, (16, 96))
    assert out.tolist() == [[16, 17, 18, 19], [95, 94, 93, 92]]


def reference(top: list[int], seeds: int, radius: int, start: int, end: int) -> list[int]:
    nearest_first = sorted(range(-radius, radius + 1), key=lambda o: (abs(o), o))  # 0, -1, 1, -2, 2, ...
    order = [p + o for p in top[:seeds] for o in nearest_first if start <= p + o < end] + top
    seen: list[int] = []
    for p in order:
        if p not in seen:
            seen.append(p)
    return seen[: len(top)]


@pytest.mark.parametrize(
    "rows,n,seeds,radius,start,end", [(3, 8, 2, 1, 0, 40), (4, 64, 16, 8, 16, 500), (2, 5, 5, 0, 3, 9)]
)
def test_matches_the_reference(rows, n, seeds, radius, start, end):
    g = torch.Generator().manual_seed(rows * n)
    top = torch.stack([torch.randperm(end - start, generator=g)[:n] + start for _ in range(rows)])
    out = with_spans(top, seeds, radius, (start, end))
    for r in range(rows):
        assert out[r].tolist() == reference(top[r].tolist(), seeds, radius, start, end)


def test_chunk_span_is_validated():
    assert LouisKVConfig().chunk_span == 8  # the default (docs/TUNING.md: exact chunks)
    assert LouisKVConfig(chunk_span=0).chunk_span == 0  # off
    with pytest.raises(ValueError, match="chunk_span"):
        LouisKVConfig(chunk_span=-1)
    with pytest.raises(ValueError, match="chunk_span"):
        LouisKVConfig(chunk_span=257)
