"""Copy between a device tensor and pinned host memory by a kernel, not the copy engine: the
batched engine's slot tables can reach the GPU, and each step's tokens and boundary flags the
host, this way (Engine host_copies="kernel"). On one GPU shared with the daemon, whose
retrievals move hundreds of MiB host to device by DMA, a small `copy_(non_blocking=True)` from
the worker queues on the same copy engines and waits for those transfers; a kernel's loads or
stores over PCIe (UVA: pinned memory is addressable from the device) do not. (Measured once,
removing that wait did not speed the step up; engine/engine.py says why it is not the default.)

Kernel: `pinned_copy_triton.py`; reference: `dst.copy_(src)`.
"""

from __future__ import annotations

import torch

from kvrecall.kernels._triton import use_triton


def pinned_copy(src: torch.Tensor, dst: torch.Tensor, impl: str = "auto") -> None:
    """dst[...] = src[...] for contiguous tensors of one dtype and shape, one of them on a CUDA
    device and the other there too or in pinned host memory (impl "auto": by a Triton kernel
    there; anywhere else, and with impl "reference", `dst.copy_(src)`)."""
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"src {src.dtype}{tuple(src.shape)} and dst {dst.dtype}{tuple(dst.shape)} differ")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("src and dst must be contiguous")
    device = src.device if src.is_cuda else dst.device
    reachable = all(t.device == device or t.is_pinned() for t in (src, dst))
    if src.numel() and reachable and use_triton(impl, device):
        from kvrecall.kernels.pinned_copy_triton import pinned_copy_triton

        pinned_copy_triton(src, dst)
        return
    dst.copy_(src)
