"""louiskv's segmented prompt clustering: ceil(N / cluster_size) units per row whatever the
segmenting, every token in exactly one unit, each segment clustered as on its own, and the
same as cluster_pieces when the prompt fits one segment. The positions come grouped by unit
(unit u's sizes[u] after those of units < u): the unit table stores nothing else per token."""

from __future__ import annotations

import math

import pytest
import torch

import kvrecall.kernels as kernels
from kvrecall.server.policies.louiskv import cluster_pieces, cluster_segments


@pytest.mark.parametrize("N,cluster_size,segment", [(100, 8, 32), (96, 8, 32), (37, 4, 16), (50, 16, 64), (130, 10, 45)])
def test_every_token_in_one_unit_of_its_segment(N, cluster_size, segment):
    B, D, first = 3, 8, 1000
    keys = torch.randn(B, N, D, generator=torch.Generator().manual_seed(N))
    centroids, sizes, position = cluster_segments(keys, cluster_size, 4, first, segment)
    k = math.ceil(N / cluster_size)
    per = (segment // cluster_size) * cluster_size
    assert centroids.shape == (B, k, D) and sizes.shape == (B, k) and position.shape == (B, N)
    for b in range(B):
        assert sorted(position[b].tolist()) == list(range(first, first + N))  # each token once
        assert int(sizes[b].sum()) == N
        # grouped by unit: unit u's sizes[u] candidates follow those of units < u (what
        # expand_grouped reads), ascending, all of one segment, each nearest its unit's centroid
        for u, members in enumerate(torch.split(position[b] - first, sizes[b].tolist())):
            if not len(members):
                continue
            assert torch.equal(members, members.sort().values)
            segment_of = int(members[0]) // per
            assert ((members // per) == segment_of).all()
            units = range(segment_of * (per // cluster_size), min(k, (segment_of + 1) * (per // cluster_size)))
            nearest = kernels.kmeans_assign(keys[b, members][None], centroids[b, units][None])[0]
            assert (nearest + units.start == u).all()
    # each segment's units are that segment's own k-means
    for s, start in enumerate(range(0, N - N % per, per)):
        alone = cluster_pieces(keys[:, start : start + per], per // cluster_size, 4, first + start)
        units = slice(s * (per // cluster_size), (s + 1) * (per // cluster_size))
        assert torch.allclose(centroids[:, units], alone[0], atol=1e-5)
        assert torch.equal(position[:, start : start + per], alone[2])

def test_one_segment_is_cluster_pieces():
    keys = torch.randn(2, 40, 8, generator=torch.Generator().manual_seed(0))
    got = cluster_segments(keys, 8, 4, 7, segment=64)
    want = cluster_pieces(keys, 5, 4, 7)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
