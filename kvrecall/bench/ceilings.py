"""Part 1: the machine's ceilings, measured in this run: pinned host->device copy, device->device
copy and a bf16 matrix product. Every percentage and floor in the report divides by these."""

from __future__ import annotations

from typing import Any

import torch

from kvrecall.bench.common import GiB, Timing, gbps, log, time_fn


class HostPool:
    """One block of host memory that the benchmark's host-side KV lives in.

    Pinned (page-locked, cudaHostAlloc through PyTorch's host allocator) when a GPU is present, so
    kernels can read it through UVA; plain memory on a CPU-only host. Filled with random bytes
    (normal bf16 values, never zeros). Owned by this object; freed when it is dropped.
    """

    def __init__(self, n_bytes: int, device: torch.device):
        assert n_bytes % 4096 == 0, "the pool is sliced into rows of up to 4 KB"
        self.n_bytes = n_bytes
        self.pinned = device.type == "cuda"
        self.data = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        self._fill_random(device)

    def _fill_random(self, device: torch.device) -> None:
        # Normal bf16 values: valid KV data for the decode part (random bits would hold NaNs).
        values = self.data.view(torch.bfloat16)
        if device.type != "cuda":
            values.normal_()
            return
        chunk = min(values.numel(), (256 << 20) // 2)
        scratch = torch.empty(chunk, dtype=torch.bfloat16, device=device)
        for start in range(0, values.numel(), chunk):
            part = values[start:start + chunk]
            scratch[: part.numel()].normal_()
            part.copy_(scratch[: part.numel()])
        torch.cuda.synchronize(device)

    def view(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole pool as a flat tensor of ``dtype``."""
        return self.data.view(dtype)


def measure_ceilings(pool: HostPool, device: torch.device, copy_bytes: int, gemm_n: int, reps: int) -> dict[str, Any]:
    """Pinned H2D copy, D2D copy (both byte conventions) and bf16 GEMM rate."""
    if device.type != "cuda":
        return _cpu_ceilings(copy_bytes, reps)
    copy_bytes = min(copy_bytes, pool.n_bytes)
    h2d, d2d = _time_copies(pool, device, copy_bytes, reps)
    log(f"  h2d pinned copy {copy_bytes / GiB:.2f} GiB: {gbps(copy_bytes, h2d.median_ms):.1f} GB/s")
    d2d_copy = gbps(copy_bytes, d2d.median_ms)
    log(f"  d2d copy: {d2d_copy:.0f} GB/s copied, {2 * d2d_copy:.0f} GB/s read+written")
    gemm = _time_gemm(device, gemm_n, reps)
    tflops = 2 * gemm_n**3 / (gemm.median_ms * 1e-3) / 1e12
    log(f"  bf16 gemm {gemm_n}^3: {tflops:.0f} TFLOP/s")
    return {
        "h2d_pinned": {"bytes": copy_bytes, "GBps": gbps(copy_bytes, h2d.median_ms), **h2d.as_dict(),
                       "note": "one cudaMemcpyAsync from pinned host memory (torch copy_, non_blocking)"},
        "d2d": {"bytes": copy_bytes, "copy_GBps": d2d_copy, "read_plus_write_GBps": 2 * d2d_copy,
                **d2d.as_dict(),
                "note": "copy_GBps counts the bytes copied once; read_plus_write_GBps counts bytes read "
                        "plus bytes written (the HBM traffic, the convention of METHOD.md)"},
        "gemm_bf16": {"n": gemm_n, "TFLOPs": tflops, **gemm.as_dict(), "note": "random data"},
    }


def _time_copies(pool: HostPool, device: torch.device, n_bytes: int, reps: int) -> tuple[Timing, Timing]:
    """One large pinned host->device copy, and one device->device copy of the same size."""
    src_host = pool.data[:n_bytes]
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    src_dev = torch.empty_like(dst).random_(0, 255)
    h2d = time_fn(lambda: dst.copy_(src_host, non_blocking=True), device, warmup=2, reps=reps)
    d2d = time_fn(lambda: dst.copy_(src_dev), device, warmup=3, reps=reps)
    return h2d, d2d


def _time_gemm(device: torch.device, n: int, reps: int) -> Timing:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return time_fn(lambda: a @ b, device, warmup=3, reps=reps)


def _cpu_ceilings(copy_bytes: int, reps: int) -> dict[str, Any]:
    """No GPU: a host memcpy stands in for the copy ceiling (labelled so), so code paths run."""
    device = torch.device("cpu")
    n = min(copy_bytes, 64 << 20)
    src = torch.empty(n, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    host = time_fn(lambda: dst.copy_(src), device, warmup=1, reps=reps)
    return {
        "skipped": "no CUDA device: h2d / d2d / gemm not measured",
        "host_copy": {"bytes": n, "GBps": gbps(n, host.median_ms), **host.as_dict(),
                      "note": "CPU memcpy, used as the ceiling of the CPU-only code path"},
    }


def copy_ceiling_gbps(ceilings: dict[str, Any]) -> float:
    """The copy ceiling that gather rates are compared with (H2D on a GPU, memcpy on a CPU)."""
    return ceilings["h2d_pinned"]["GBps"] if "h2d_pinned" in ceilings else ceilings["host_copy"]["GBps"]
