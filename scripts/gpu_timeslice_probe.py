"""Does another process's GPU work slow a captured decode step by its GPU time, or by its launches?

Two processes on one GPU (no MPS) time-slice: while the daemon has work, the worker's kernels wait.
This probe separates the two costs the 32K x 8 e2e row may pay (issue #17): process A replays a
captured, memory-bound "step" (32 layers of GEMVs at batch 8, a few ms) and times each replay with
CUDA events; process B, beside it, submits every PERIOD ms a burst of elementwise kernels whose
total GPU time is about the same in every mode but whose launch count differs:

  idle      nothing
  one       1 kernel per burst
  many      N kernels per burst, launched one by one from Python
  gappy     the same with 30 us of host work between launches (the daemon's way today)
  graph     the same N kernels captured once as a CUDA graph, one launch per burst
  tiny      N kernels of almost no work (the switches alone)
  dma       no kernels: --dma-mib MiB from pinned host memory to the device per burst, in 16 MiB copies on
            a side stream (the daemon's staged placement moves 123 MiB a retrieval at 32K x 8)
  dma_one   dma, then the one kernel of `one` (a retrieval's copies and its kernels)
  gated     gappy's launches queued behind the daemon's launch gate (kvrecall/launch_gate.py:
            cuStreamWaitValue32 on a pinned host word the host sets after the last launch), so the GPU
            sees them as one burst however slowly they come

--continuous: A replays its step back to back (20 per CUDA-event window, no host sync between), as
the engine with overlap does, so B's kernels must preempt A's instead of filling the gaps between its
replays (where empty kernels cost nothing).

Usage (GPU): python scripts/gpu_timeslice_probe.py --out FILE [--n 70] [--burst-us 900] [--modes idle,dma,...]
Prints a table (A's step per mode, against idle) and writes JSON with the date, device, command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # kvrecall

MODES = ("idle", "one", "many", "gappy", "graph", "tiny", "dma", "dma_one", "gated")
DMA_CHUNK = 16 << 20  # bytes per host-to-device copy in the dma modes (placement_staged's chunk)
READY_S = 45.0  # role b's start and its own timing of a burst, at most
GAP_S = 30e-6  # gappy: host time between two launches (the daemon's Python between its kernels)


def buffer_for(us: float, device: torch.device) -> torch.Tensor:
    """A bf16 buffer whose in-place scale takes about `us` microseconds (read + write at ~3.5 TB/s)."""
    elements = max(1024, int(us * 1e-6 * 3.5e12 / 4))
    return torch.ones(elements, dtype=torch.bfloat16, device=device)


def burst_fn(mode: str, n: int, burst_us: float, device: torch.device, dma_mib: float = 0.0):
    if mode.startswith("dma"):
        chunks = max(1, round(dma_mib * (1 << 20) / DMA_CHUNK))
        host = torch.ones(DMA_CHUNK, dtype=torch.uint8, pin_memory=True)
        dest = torch.empty(chunks, DMA_CHUNK, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        kernel = burst_fn("one", 1, burst_us, device) if mode == "dma_one" else None

        def copies():
            with torch.cuda.stream(side):
                for k in range(chunks):
                    dest[k].copy_(host, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(side)
            if kernel is not None:
                kernel()

        return copies
    if mode == "gated":  # the daemon's own gate (kvrecall/launch_gate.py)
        from kvrecall.launch_gate import Driver, Gate

        gate, stream = Gate(Driver()), torch.cuda.current_stream(device)
        inner = burst_fn("gappy", n, burst_us, device)

        def gated():
            gate.close(stream)
            inner()
            gate.open()

        return gated
    if mode == "one":
        bufs = [buffer_for(burst_us, device)]
    elif mode in ("many", "gappy", "graph"):
        bufs = [buffer_for(burst_us / n, device) for _ in range(n)]
    else:  # tiny
        bufs = [torch.ones(1024, dtype=torch.bfloat16, device=device) for _ in range(n)]

    def launch():
        for b in bufs:
            b.mul_(1.0)
            if mode == "gappy":
                until = time.perf_counter() + GAP_S
                while time.perf_counter() < until:
                    pass

    if mode != "graph":
        return launch
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    return graph.replay


def role_b(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    burst = burst_fn(args.mode, args.n, args.burst_us, device, args.dma_mib)
    for _ in range(5):
        burst()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        burst()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    with open(args.ready, "w") as f:
        json.dump({"burst_alone_ms": statistics.median(times)}, f)
    period = args.period_ms / 1000
    next_at = time.perf_counter()
    while True:
        burst()
        torch.cuda.synchronize()
        next_at += period
        time.sleep(max(0.0, next_at - time.perf_counter()))


def step_graph(device: torch.device, batch: int, layers: int):
    weights = [torch.randn(4096, 14336, dtype=torch.bfloat16, device=device) * 0.01 for _ in range(layers)]
    back = [torch.randn(14336, 4096, dtype=torch.bfloat16, device=device) * 0.01 for _ in range(layers)]
    x = torch.randn(batch, 4096, dtype=torch.bfloat16, device=device)

    def step():
        h = x
        for w, b in zip(weights, back, strict=True):
            h = torch.nn.functional.silu(h @ w) @ b
        return h

    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def time_steps(graph, steps: int, continuous: bool = False) -> list[float]:
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    out = []
    if continuous:  # windows of 20 replays back to back: the GPU never idles between steps
        for _ in range(max(1, steps // 20)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 20)
        return out
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="a")
    parser.add_argument("--mode", default="idle")
    parser.add_argument("--ready", default="")
    parser.add_argument("--n", type=int, default=70, help="kernels per burst (many, graph, tiny)")
    parser.add_argument("--burst-us", type=float, default=900.0, help="GPU time of one burst")
    parser.add_argument("--period-ms", type=float, default=8.0, help="one burst every this many ms")
    parser.add_argument("--dma-mib", type=float, default=123.0, help="MiB a burst copies host to device (dma modes)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (idle first)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=96, help="GEMV pairs per step (96: ~6-7 ms)")
    parser.add_argument("--continuous", action="store_true", help="A replays back to back (see the docstring)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.role == "b":
        role_b(args)
        return
    graph = step_graph(torch.device("cuda"), args.batch, args.layers)
    rows = {}
    modes = args.modes.split(",")
    if modes[0] != "idle" or not set(modes) <= set(MODES):
        raise SystemExit(f"--modes: idle first, then any of {', '.join(MODES)}")
    for mode in modes:
        proc, alone = None, None
        if mode != "idle":
            ready = f"/tmp/timeslice-ready-{os.getpid()}-{mode}"
            cmd = [sys.executable, __file__, "--role", "b", "--mode", mode, "--ready", ready, "--n", str(args.n),
                   "--burst-us", str(args.burst_us), "--period-ms", str(args.period_ms), "--dma-mib", str(args.dma_mib)]
            proc = subprocess.Popen(cmd)
            deadline = time.monotonic() + READY_S
            while not os.path.exists(ready) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not os.path.exists(ready):  # exited or hung (a gated burst never released, say): the next mode
                why = f"exited {proc.returncode}" if proc.poll() is not None else f"not ready after {READY_S:.0f} s"
                proc.kill()
                proc.wait()
                print(f"role b ({mode}) {why}: skipped", flush=True)
                rows[mode] = {"error": why}
                continue
            time.sleep(0.2)
            with open(ready) as f:
                alone = json.load(f)["burst_alone_ms"]
        try:
            steps = time_steps(graph, args.steps, args.continuous)
        finally:
            if proc is not None:
                proc.kill()
                proc.wait()
        rows[mode] = {"step_mean_ms": statistics.fmean(steps), "step_p50_ms": statistics.median(steps),
                      "burst_alone_ms": alone}
    idle = rows["idle"]["step_mean_ms"]
    bursts_per_step = idle / args.period_ms
    print(f"{'mode':6} {'step mean ms':>12} {'vs idle':>8} {'burst alone ms':>15} {'expected (gpu time) ms':>22}")
    for mode, r in rows.items():
        if "error" in r:
            print(f"{mode:6} {r['error']}")
            continue
        expected = idle + (r["burst_alone_ms"] or 0.0) * bursts_per_step
        r["expected_by_gpu_time_ms"] = expected
        print(f"{mode:6} {r['step_mean_ms']:12.3f} {r['step_mean_ms'] / idle:8.3f} "
              f"{(r['burst_alone_ms'] or 0):15.3f} {expected:22.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.now(UTC).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "command": " ".join(["python", *sys.argv]), "n": args.n, "burst_us": args.burst_us,
                       "period_ms": args.period_ms, "dma_mib": args.dma_mib, "continuous": args.continuous, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
