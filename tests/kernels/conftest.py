"""Fixtures for the kernel tests: Triton kernels run on CUDA, or on CPU through Triton's interpreter.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, its own library
included (decorated at `import triton`), so on a machine without CUDA the variable is set
here, before anything imports triton: kvrecall.kernels imports it lazily, on the first kernel
call, and `import torch` does not import it. If triton was imported earlier in the process
without the variable, the Triton comparisons skip with that reason.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402

from kvrecall.kernels._triton import interpreter_ready, triton_importable  # noqa: E402

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for kernel vs reference: both compute in float32 from the same inputs, so only
# summation order differs; 16-bit inputs get more room for their larger rounding of inputs
# that are derived in float32 (e.g. centroids) and for bigger magnitudes.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def triton_device(device: torch.device) -> torch.device:
    """The device Triton kernels run on here; skips the test where none can run."""
    if not triton_importable():
        pytest.skip("triton is not importable")
    if device.type == "cpu" and not interpreter_ready():
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set: run tests/kernels in its own process"
        )
    return device


MakeTensor = Callable[..., torch.Tensor]


@pytest.fixture
def randn(device: torch.device) -> MakeTensor:
    """randn(seed, *shape, dtype=float32): reproducible normal samples on the test device."""

    def make(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return make


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Kernel output vs reference within the tolerance of the inputs' dtype (inf == inf)."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True)


@pytest.fixture
def close() -> Callable[..., None]:
    return assert_close
