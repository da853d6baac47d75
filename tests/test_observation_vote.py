"""The ingest's observation vote (policies/snapkv.py): per-query weights, and the "scales" weights
as the sum of the last 4, 8, ... queries' mean votes."""

from __future__ import annotations

import pytest
import torch

from kvrecall.server.policies.snapkv import observation_scores, scale_weights


@pytest.mark.parametrize(
    "n,want",
    [
        (1, [1.0]),
        (4, [0.25] * 4),
        (6, [1 / 6] * 2 + [1 / 6 + 1 / 4] * 4),
        (16, [1 / 16] * 8 + [1 / 16 + 1 / 8] * 4 + [1 / 16 + 1 / 8 + 1 / 4] * 4),
    ],
)
def test_scale_weights_sum_each_scales_mean(n, want):
    assert torch.allclose(scale_weights(n), torch.tensor(want))


@pytest.mark.parametrize("n", [5, 16, 32])
def test_weighted_scores_are_the_sum_of_each_scales_mean_vote(n):
    """observation_scores with scale_weights == the mean votes of the last 4, 8, ..., n queries
    (each scored causally where it stands), summed."""
    g = torch.Generator().manual_seed(n)
    Hq, H, T, D = 4, 2, 40, 8
    queries, keys = torch.randn(Hq, n, D, generator=g), torch.randn(H, T, D, generator=g)
    got = observation_scores(queries, keys, Hq // H, weights=scale_weights(n))
    full = torch.zeros(n, H, T)
    for i in range(n):
        full[i, :, : T - n + i + 1] = observation_scores(queries[:, i : i + 1], keys[:, : T - n + i + 1], Hq // H)
    sizes = [s for s in (4, 8, 16) if s < n] + [n]
    want = sum(full[n - s :].mean(dim=0) for s in sizes)
    assert torch.allclose(got, want, atol=1e-5)
