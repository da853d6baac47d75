"""Optional Triton: whether a call runs a Triton kernel or the PyTorch reference.

Triton is imported lazily, the first time a call asks for a kernel (CUDA tensors with
impl="auto", or impl="triton"), so `import kvrecall.kernels` works without Triton and the
daemon's CPU path never pays for importing it.

The interpreter: Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, and
that includes its own library (`tl.sum`, `tl.max`, ...), decorated when `triton` is first
imported. So kernels run on CPU tensors only when TRITON_INTERPRET=1 was set before the first
`import triton` in the process; `interpreter_ready()` checks exactly that.
"""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "reference")
# tl.dot on float32 operands: three TF32 passes, float32-level error at tensor-core speed.
FP32_DOT_PRECISION = "tf32x3"
_TRUE = ("1", "true", "on", "yes")


@functools.cache
def triton_importable() -> bool:
    """True when `import triton` succeeds (imports it on the first call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU tensors in this process."""
    if not interpreting() or not triton_importable():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # tl.sum is a @triton.jit function of Triton's own library: decorated at `import triton`.
    return isinstance(tl.sum, InterpretedFunction)


def use_triton(impl: str, device: torch.device) -> bool:
    """Resolve `impl` for tensors on `device`: True = run the Triton kernel.

    "auto" picks Triton for CUDA tensors when it is importable; "triton" insists and raises
    RuntimeError where no kernel can run; "reference" always uses the PyTorch reference.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if impl == "auto":
        return device.type == "cuda" and triton_importable()
    if not triton_importable():
        raise RuntimeError("impl='triton': triton is not importable")
    if device.type != "cuda" and not interpreter_ready():
        raise RuntimeError(
            f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is first imported"
        )
    return True


def native_dot(*dtypes: torch.dtype) -> bool:
    """Whether tl.dot may run on these operand dtypes as they are: one 16-bit dtype for all.

    Exact wherever one operand is 0/1 or both are 16-bit values (fp32 accumulation). Not
    under the interpreter for bfloat16: it multiplies bf16 dot operands wrongly (Triton 3.9).
    """
    if len(set(dtypes)) != 1 or dtypes[0] not in (torch.float16, torch.bfloat16):
        return False
    return dtypes[0] == torch.float16 or not interpreting()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(n - 1, 0).bit_length()
