"""impl dispatch: "auto" / "triton" / "reference", lazy and optional Triton, device checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvrecall.kernels as K

REPO_ROOT = Path(__file__).resolve().parents[2]

# Every op once on small CPU tensors with impl="auto"; prints whether triton got imported.
EVERY_OP_ON_CPU = """
import sys
import torch
import kvrecall.kernels as K

x = torch.randn(2, 9, 4)
centroids, assign, counts = K.kmeans(x, 3, iters=2)
K.kmeans_update(x, assign, 3)
valid = torch.ones(2, 3, dtype=torch.bool)
scores = K.score_units(x[:, :2], centroids, valid)
K.select_under_budget(scores, counts, 5)
K.gather_rows(torch.arange(10.0), torch.tensor([1, 5]), torch.zeros(6), torch.tensor([0, 3]), 3)
K.cosine_similarity(x, x)
K.window_scores(x[:, :, 0].contiguous(), 4, "topmean")
kmin, kmax = K.quest_page_bounds(x, 4)
K.quest_page_scores(x[:, :2], kmin, kmax, valid)
K.masked_attention(x[0, :4], x, x, torch.ones(2, 9, dtype=torch.bool), 0.5)
print("triton imported:", sys.modules.get("triton") is not None)
try:
    K.cosine_similarity(x, x, impl="triton")
except RuntimeError as error:
    print("forced:", error)
"""


def run_python(prelude: str, env_update: dict[str, str]) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(env_update)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    code = textwrap.dedent(prelude) + EVERY_OP_ON_CPU
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_every_op_runs_without_triton() -> None:
    out = run_python("import sys\nsys.modules['triton'] = None  # import triton now fails\n", {})
    assert "triton imported: False" in out
    assert "forced: impl='triton': triton is not importable" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_auto_on_cpu_never_imports_triton_and_forcing_needs_the_interpreter() -> None:
    out = run_python("", {"TRITON_INTERPRET": "0"})
    assert "triton imported: False" in out
    assert "needs TRITON_INTERPRET=1" in out


@pytest.mark.parametrize("impl", ["cuda", "", "Triton"])
def test_unknown_impl_is_rejected(device: torch.device, impl: str) -> None:
    a = torch.zeros(1, 2, 3, device=device)
    with pytest.raises(ValueError, match="impl: expected one of"):
        K.cosine_similarity(a, a, impl=impl)
    with pytest.raises(ValueError, match="impl: expected one of"):
        K.masked_attention(a[0], a, a, torch.ones(1, 2, dtype=torch.bool, device=device), 1.0, impl=impl)


def test_non_tensor_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="a: expected a torch.Tensor, got list"):
        K.cosine_similarity([[[1.0]]], torch.zeros(1, 1, 1))  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_on_different_devices_are_rejected() -> None:
    with pytest.raises(ValueError, match="reps: on cpu"):
        K.score_units(
            torch.zeros(1, 2, 4, device="cuda"),
            torch.zeros(1, 3, 4),
            torch.ones(1, 3, dtype=torch.bool, device="cuda"),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_runs_the_kernel() -> None:
    a = torch.randn(2, 3, 16, device="cuda")
    torch.testing.assert_close(K.cosine_similarity(a, a), torch.ones(2, 3, device="cuda"))
    assert "kvrecall.kernels.cosine_triton" in sys.modules  # imported lazily, on this first kernel call
