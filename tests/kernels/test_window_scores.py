"""window_scores: Triton vs reference, and the reference's semantics."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kvrecall.kernels as K
from kvrecall.kernels._checks import FLOAT_DTYPES

MakeTensor = Callable[..., torch.Tensor]


def by_hand(row: list[float], window_size: int, mode: str) -> list[float]:
    scores = []
    for start in range(0, len(row), window_size):
        window = sorted(row[start : start + window_size], reverse=True)
        kept = window if mode == "mean" else window[: (len(window) + 1) // 2]
        scores.append(sum(kept) / len(kept))
    return scores


@pytest.mark.parametrize("mode", ["mean", "topmean"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    ("batch", "tokens", "window"),
    [(1, 1, 1), (2, 53, 7), (3, 64, 16), (2, 100, 1), (2, 5, 9), (2, 300, 33), (2, 0, 4)],
)
def test_matches_reference(
    triton_device: torch.device,
    randn: MakeTensor,
    close: Callable[..., None],
    mode: str,
    dtype: torch.dtype,
    batch: int,
    tokens: int,
    window: int,
) -> None:
    attn = randn(tokens, batch, tokens, dtype=dtype)
    got = K.window_scores(attn, window, mode, impl="triton")
    assert got.shape == (batch, -(-tokens // window))
    close(got, K.window_scores(attn, window, mode, impl="reference"), dtype)


def test_wide_windows_fall_back_to_the_reference(
    triton_device: torch.device, randn: MakeTensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvrecall.kernels import windows_triton as windows

    monkeypatch.setattr(windows, "MAX_WINDOW", 4)
    attn = randn(3, 2, 40)
    torch.testing.assert_close(
        K.window_scores(attn, 9, "topmean", impl="triton"),
        K.window_scores(attn, 9, "topmean", impl="reference"),
    )


@pytest.mark.parametrize("mode", ["mean", "topmean"])
@pytest.mark.parametrize(("tokens", "window"), [(1, 1), (10, 3), (12, 4), (7, 10), (9, 2)])
def test_reference_matches_the_definition(randn: MakeTensor, mode: str, tokens: int, window: int) -> None:
    attn = randn(4, 2, tokens)
    got = K.window_scores(attn, window, mode)
    for b in range(2):
        torch.testing.assert_close(got[b].tolist(), by_hand(attn[b].tolist(), window, mode))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: K.window_scores(torch.zeros(2, 8, device=d), 0), "window_size"),
        (lambda d: K.window_scores(torch.zeros(2, 8, device=d), 4, "median"), "mode"),
        (lambda d: K.window_scores(torch.zeros(8, device=d), 4), "attn: expected 2 dims"),
        (lambda d: K.window_scores(torch.zeros(2, 8, dtype=torch.int32, device=d), 4), "attn: dtype"),
    ],
)
def test_validation_errors_name_the_argument(
    device: torch.device, call: Callable[[torch.device], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(device)
