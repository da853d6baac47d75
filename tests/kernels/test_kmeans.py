"""kmeans_assign / kmeans_update / kmeans: Triton vs reference, and the reference's semantics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels import reference
from kvrecall.kernels._checks import FLOAT_DTYPES

MakeTensor = Callable[..., torch.Tensor]


def cosine_sims(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[B, N, K] float64 cosine scores, computed independently of the code under test."""
    unit = centroids.double() / centroids.double().norm(dim=-1, keepdim=True).clamp_min(reference.EPS)
    return torch.einsum("bnd,bkd->bnk", x.double(), unit)


def blobs(randn: MakeTensor, seed: int, batch: int, n: int, k: int, dim: int) -> torch.Tensor:
    """n // k consecutive points around each of k random directions: one clear answer, and the
    evenly spaced initial points land one in each blob."""
    centres = randn(seed, batch, k, dim) * 10
    member = torch.arange(n, device=centres.device) * k // n
    return centres[:, member] + randn(seed + 1, batch, n, dim)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "n", "k", "dim"),
    [(1, 1, 1, 1), (2, 37, 5, 20), (3, 130, 70, 33), (2, 9, 3, 130), (2, 0, 3, 8), (0, 4, 2, 8)],
)
def test_assign_matches_reference(
    triton_device: torch.device, randn: MakeTensor, dtype: torch.dtype, batch: int, n: int, k: int, dim: int
) -> None:
    x = randn(1, batch, n, dim, dtype=dtype)
    centroids = randn(2, batch, k, dim)
    got = K.kmeans_assign(x, centroids, impl="triton")
    want = K.kmeans_assign(x, centroids, impl="reference")
    assert got.dtype == torch.int64 and got.shape == (batch, n)
    if n and batch:
        # Equal, or a near tie whose two similarities differ only by float rounding.
        sims = cosine_sims(x, centroids)
        gap = sims.gather(2, want.unsqueeze(-1)) - sims.gather(2, got.unsqueeze(-1))
        assert gap.abs().max().item() < 1e-4
        assert (got == want).float().mean().item() > 0.95


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_assign_ties_go_to_lowest_index(triton_device: torch.device, randn: MakeTensor, impl: str) -> None:
    centroids = randn(3, 2, 6, 16)
    centroids[:, 4] = centroids[:, 1] * 2  # same direction: identical cosine
    centroids[:, 5] = centroids[:, 1]
    x = centroids[:, [1, 4, 5]].clone()
    assert (K.kmeans_assign(x, centroids, impl=impl) == 1).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "n", "k", "dim"),
    [
        (1, 1, 1, 1),
        (2, 37, 5, 20),
        (2, 150, 70, 130),
        (2, 0, 3, 8),
        (1, 100, 1, 16),  # one cluster spans many 16-point chunks
        (2, 5, 40, 8),  # more clusters than points: most stay empty
        (3, 257, 9, 64),
    ],
)
def test_update_matches_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    close: Callable[..., None],
    dtype: torch.dtype,
    batch: int,
    n: int,
    k: int,
    dim: int,
) -> None:
    x = randn(4, batch, n, dim, dtype=dtype)
    generator = torch.Generator().manual_seed(5)
    # -1 and k are outside [0, k): those points join no cluster.
    assign = torch.randint(-1, k + 1, (batch, n), generator=generator).to(x.device)
    got_centroids, got_counts = K.kmeans_update(x, assign, k, impl="triton")
    want_centroids, want_counts = K.kmeans_update(x, assign, k, impl="reference")
    assert torch.equal(got_counts, want_counts)
    close(got_centroids, want_centroids, dtype)


@pytest.mark.parametrize("k", [1, 4, 300])
def test_sort_by_cluster_orders_points_stably(triton_device: torch.device, k: int) -> None:
    from kvrecall.kernels.clustering_triton import sort_by_cluster

    generator = torch.Generator().manual_seed(k)
    assign = torch.randint(-1, k + 1, (3, 500), generator=generator).to(triton_device)
    order, bounds = sort_by_cluster(assign, k)
    assert bounds.shape == (3, k + 1) and order.shape == (3, 500)
    for b in range(3):
        for c in (0, k // 2, k - 1):
            members = order[b, bounds[b, c] : bounds[b, c + 1]]
            assert torch.equal(members, (assign[b] == c).nonzero().squeeze(1))  # ascending index


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "n", "k", "dim"),
    [(1, 1, 1, 1), (2, 129, 130, 64), (1, 200, 257, 128), (2, 40, 7, 200), (1, 300, 3, 16)],
)
def test_assign_with_16bit_centroids_matches_reference(
    triton_device: torch.device, randn: MakeTensor, dtype: torch.dtype, batch: int, n: int, k: int, dim: int
) -> None:
    # What Lloyd's loop hands the kernel for 16-bit keys: unit centroids in the keys' dtype
    # (one tensor-core pass, exact products): only float32 summation order differs.
    x = randn(12, batch, n, dim, dtype=dtype)
    centroids = reference.assign_centroids(randn(13, batch, k, dim), dtype)
    got = K.kmeans_assign(x, centroids, impl="triton")
    want = K.kmeans_assign(x, centroids, impl="reference")
    sims = cosine_sims(x, centroids)
    gap = sims.gather(2, want.unsqueeze(-1)) - sims.gather(2, got.unsqueeze(-1))
    assert gap.abs().max().item() < 1e-5
    assert (got == want).float().mean().item() > 0.99


def test_assign_centroids_rounds_unit_rows_for_16bit_points_only(randn: MakeTensor) -> None:
    centroids = randn(14, 2, 5, 8) * 3
    assert reference.assign_centroids(centroids, torch.float32) is centroids
    rounded = reference.assign_centroids(centroids, torch.bfloat16)
    assert rounded.dtype == torch.bfloat16
    torch.testing.assert_close(
        rounded.float().norm(dim=-1), torch.ones(2, 5, device=centroids.device), atol=1e-2, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kmeans_16bit_triton_matches_reference(
    triton_device: torch.device, randn: MakeTensor, dtype: torch.dtype
) -> None:
    x = blobs(randn, 15, batch=3, n=160, k=10, dim=64).to(dtype)
    got = K.kmeans(x, 10, iters=3, impl="triton")
    want = K.kmeans(x, 10, iters=3, impl="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_update_empty_cluster_is_zero_with_count_zero(device: torch.device, randn: MakeTensor) -> None:
    x = randn(6, 1, 4, 3)
    assign = torch.tensor([[0, 0, 2, -1]], device=device)
    centroids, counts = K.kmeans_update(x, assign, 3)
    assert counts.tolist() == [[2, 0, 1]]
    assert torch.equal(centroids[0, 1], torch.zeros(3, device=device))
    torch.testing.assert_close(centroids[0, 0], x[0, :2].mean(0))
    torch.testing.assert_close(centroids[0, 2], x[0, 2])


def test_kmeans_triton_matches_reference(triton_device: torch.device, randn: MakeTensor) -> None:
    x = blobs(randn, 7, batch=2, n=90, k=6, dim=24)
    got = K.kmeans(x, 6, iters=4, impl="triton")
    want = K.kmeans(x, 6, iters=4, impl="reference")
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize(("n", "k", "iters"), [(50, 7, 0), (50, 7, 5), (13, 13, 3), (200, 17, 2)])
def test_kmeans_assigns_every_point_to_its_nearest_centroid(
    randn: MakeTensor, n: int, k: int, iters: int
) -> None:
    x = randn(8, 3, n, 10)
    centroids, assign, counts = K.kmeans(x, k, iters)
    assert centroids.shape == (3, k, 10) and centroids.dtype == torch.float32
    sims = cosine_sims(x, centroids)
    chosen = sims.gather(2, assign.unsqueeze(-1)).squeeze(-1)
    assert (chosen >= sims.amax(dim=-1) - 1e-6).all()
    assert torch.equal(counts, torch.stack([torch.bincount(a, minlength=k) for a in assign]))
    assert counts.sum(dim=1).tolist() == [n] * 3


def test_kmeans_converged_centroids_are_member_means(randn: MakeTensor) -> None:
    x = blobs(randn, 9, batch=2, n=60, k=4, dim=8)
    centroids, assign, counts = K.kmeans(x, 4, iters=10)
    assert (counts == 15).all()  # one cluster per blob
    means, _ = reference.kmeans_update(x, assign, 4)
    torch.testing.assert_close(centroids, means)


def test_kmeans_is_deterministic_and_seed_rotates_the_initial_points(randn: MakeTensor) -> None:
    x = randn(10, 2, 40, 6)
    first, again = K.kmeans(x, 5, iters=0), K.kmeans(x, 5, iters=0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.testing.assert_close(first[0], x[:, [0, 8, 16, 24, 32]])
    torch.testing.assert_close(K.kmeans(x, 5, iters=0, seed=3)[0], x[:, [3, 11, 19, 27, 35]])


def test_kmeans_clamps_k_to_n_and_handles_no_points(device: torch.device, randn: MakeTensor) -> None:
    x = randn(11, 2, 3, 5)
    centroids, assign, counts = K.kmeans(x, 8, iters=2)
    assert centroids.shape == (2, 3, 5)
    assert assign.tolist() == [[0, 1, 2], [0, 1, 2]] and (counts == 1).all()
    centroids, assign, counts = K.kmeans(torch.zeros(2, 0, 5, device=device), 4, iters=3)
    assert centroids.shape == (2, 0, 5) and assign.shape == (2, 0) and counts.shape == (2, 0)


def test_kmeans_empty_cluster_keeps_its_previous_centroid(device: torch.device) -> None:
    # Init picks points 0 and 2, both (1, 0): ties send every point to cluster 0, cluster 1
    # empties, keeps (1, 0) and wins those points back (a zero centroid would win none).
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]], device=device)
    centroids, assign, counts = K.kmeans(x, 2, iters=3)
    assert assign.tolist() == [[1, 0, 1, 0]] and counts.tolist() == [[2, 2]]
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], device=device)
    centroids, assign, counts = K.kmeans(x, 2, iters=3)
    assert counts.tolist() == [[3, 0]]
    assert torch.equal(centroids[0, 1], x[0, 1])  # never the zero vector


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda d: K.kmeans_assign(
                torch.zeros(2, 3, 4, dtype=torch.int32, device=d), torch.zeros(2, 1, 4, device=d)
            ),
            "x: dtype",
        ),
        (
            lambda d: K.kmeans_assign(torch.zeros(3, 4, device=d), torch.zeros(2, 1, 4, device=d)),
            "x: expected 3 dims",
        ),
        (
            lambda d: K.kmeans_assign(torch.zeros(2, 3, 4, device=d), torch.zeros(2, 1, 5, device=d)),
            "centroids: dim 2",
        ),
        (
            lambda d: K.kmeans_assign(torch.zeros(2, 3, 4, device=d), torch.zeros(2, 0, 4, device=d)),
            "centroids: K is 0",
        ),
        (
            lambda d: K.kmeans_assign(
                torch.zeros(2, 3, 8, device=d)[..., ::2], torch.zeros(2, 1, 4, device=d)
            ),
            "x: innermost",
        ),
        (
            lambda d: K.kmeans_update(torch.zeros(2, 3, 4, device=d), torch.zeros(2, 3, device=d), 2),
            "assign: dtype",
        ),
        (
            lambda d: K.kmeans_update(
                torch.zeros(2, 3, 4, device=d), torch.zeros(2, 4, dtype=torch.long, device=d), 2
            ),
            "assign: dim 1",
        ),
        (
            lambda d: K.kmeans_update(
                torch.zeros(2, 3, 4, device=d), torch.zeros(2, 3, dtype=torch.long, device=d), 0
            ),
            "k: expected >= 1",
        ),
        (lambda d: K.kmeans(torch.zeros(2, 3, 4, device=d), 2, iters=-1), "iters"),
        (lambda d: K.kmeans(torch.zeros(2, 3, 4, device=d), 2, iters=1, impl="cuda"), "impl"),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
