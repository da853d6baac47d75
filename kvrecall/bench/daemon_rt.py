"""Boundary and append round trips through the real daemon (gRPC + working-set mapping).

`python -m kvrecall.bench.daemon_rt --out FILE [--device cuda:0] [--prompt 8192]` starts a
daemon process, opens a louiskv session of a Llama-3-8B-shaped layout (32 layers, 8 KV heads,
32 query heads, head dim 128, bf16 on CUDA / fp32 on CPU), ingests a random prompt through the
transport (CUDA IPC on a GPU, shared memory on a CPU), then times on the open Decode stream:
  * append notices (spill 16 tokens of all layers to the host tier),
  * boundaries with an unchanged query (scoring + top-k, nothing to gather: the RPC floor),
  * boundaries with a fresh random query (scoring + top-k + gather of the missing rows).
Prints p50/p99 and writes JSON with the device, versions, date and command.

`--ops` also profiles one append, one same-query and one fresh-query boundary of an in-process
Session (no gRPC) with torch.profiler and records, per operation: aten ops called from Python,
the ops that wait for the GPU on a CUDA device (item / nonzero / copies to the host), and on
CUDA the kernel launches and stream / device syncs the CUDA runtime saw. On a CPU the counts
are the guide (`--device cpu --layers 32 --prompt 1024 --budget 256 --head-dim 16`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.local import LocalDaemon


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": 1e6 * statistics.median(ordered),
        "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_us": 1e6 * statistics.fmean(ordered),
        "n": len(ordered),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# aten ops that make the host wait for the GPU when their inputs live there.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::tolist")
# aten ops that only make a view (no kernel launch on a GPU).
VIEW_OPS = {
    f"aten::{name}"
    for name in (
        "view", "reshape", "slice", "select", "narrow", "expand", "expand_as", "unsqueeze", "squeeze", "transpose",
        "alias", "as_strided", "resolve_conj", "resolve_neg", "lift_fresh", "detach", "t", "permute", "unfold",
    )
}  # fmt: skip
CUDA_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
CUDA_SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
KERNEL_OPS = (
    "score_units",
    "select_under_budget",
    "expand_selection",
    "place_retrieved",
    "spill_ring",
    "gather_rows",
    "kmeans",
)
KERNEL_MARK = "kvrecall.kernels."


def op_counts(prof) -> dict[str, int]:
    """Counts of one profiled operation (see the module docstring). Kernel ops count once
    each (on a GPU they are one Triton launch; on a CPU their PyTorch reference runs)."""
    events = prof.events()
    outer = [e for e in events if e.name.startswith("aten::") and not _under(e, ("aten::", KERNEL_MARK))]
    return {
        "kernel_ops": sum(1 for e in events if e.name.startswith(KERNEL_MARK)),
        "aten_ops": len(outer),
        "aten_ops_not_views": sum(1 for e in outer if e.name not in VIEW_OPS),
        "sync_ops": sum(1 for e in events if e.name in SYNC_OPS and not _under(e, (KERNEL_MARK,))),
        "cuda_launches": sum(1 for e in events if e.name in CUDA_LAUNCH),
        "cuda_syncs": sum(1 for e in events if e.name in CUDA_SYNC),
    }


def op_times(prof) -> dict:
    """Where one profiled operation's time went (microseconds): GPU kernel time by kernel, the
    host time spent in launch calls and in sync calls (waiting for the GPU), and each kernel
    op's host time (launcher included)."""
    from torch.autograd import DeviceType

    events = prof.events()
    kernels: dict[str, list[float]] = {}
    for e in events:
        # (the kernel ops' profiler labels show up on the GPU timeline too: not kernels)
        if e.device_type == DeviceType.CUDA and not e.name.startswith(KERNEL_MARK):
            kernels.setdefault(e.name[:80], []).append(e.device_time)
    ops: dict[str, float] = {}
    for e in events:
        if e.name.startswith(KERNEL_MARK):
            op = e.name[len(KERNEL_MARK) :]
            ops[op] = ops.get(op, 0.0) + e.cpu_time_total
    top = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:10]
    return {
        "gpu_kernel_us": round(sum(sum(v) for v in kernels.values()), 1),
        "launch_host_us": round(sum(e.cpu_time_total for e in events if e.name in CUDA_LAUNCH), 1),
        "sync_host_us": round(sum(e.cpu_time_total for e in events if e.name in CUDA_SYNC), 1),
        "kernel_op_host_us": {k: round(v, 1) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        "top_gpu_kernels": [{"name": k, "n": len(v), "us": round(sum(v), 1)} for k, v in top],
    }


def _under(event, prefixes: tuple[str, ...]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefixes):
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def labelled_kernels():
    """Wrap the kernel ops in profiler labels while profiling (restored afterwards)."""
    from torch.profiler import record_function

    from kvrecall import kernels

    saved = {name: getattr(kernels, name) for name in KERNEL_OPS if hasattr(kernels, name)}

    def label(name, op):
        @functools.wraps(op)
        def run(*args, **kwargs):
            with record_function(KERNEL_MARK + name):
                return op(*args, **kwargs)

        return run

    try:
        for name, op in saved.items():
            setattr(kernels, name, label(name, op))
        yield
    finally:
        for name, op in saved.items():
            setattr(kernels, name, op)


def profile_ops(args: argparse.Namespace) -> dict:
    """One append, one same-query and one fresh-query boundary of an in-process Session, profiled."""
    from torch.profiler import ProfilerActivity, profile

    from kvrecall.server.layout import ModelLayout
    from kvrecall.server.policies.louiskv import LouisKVConfig, LouisKVPolicy
    from kvrecall.server.pools import DevicePool, HostPool
    from kvrecall.server.session import SessionRegistry
    from kvrecall.v1 import kvrecall_pb2 as pb

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, H, Hq, D, T = args.layers, 8, 32, args.head_dim, args.prompt
    layout = ModelLayout(L, H, Hq, D, dtype, max_tokens=T + 256)
    host = HostPool(layout.max_tokens * layout.token_bytes + (64 << 20), pinned=device.type == "cuda")
    registry = SessionRegistry(host, DevicePool(8 << 30, device), 600.0)
    policy = LouisKVPolicy(LouisKVConfig(budget=args.budget), layout)
    session = registry.open("bench", layout, policy, pb.TRANSPORT_SHM, 600.0, "ops")
    kv = torch.randn(L, 2, H, T + 256, D, device=device).to(dtype)
    session.ingest(0, kv[:, :, :, :T], torch.randn(L, Hq, 1, D, device=device).to(dtype))
    ws, position = session.ws, T
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def step() -> None:
        nonlocal position
        slot = ws.plan.window_start + position % ws.plan.window
        ws.keys[:, :, slot] = kv[:, 0, :, position]
        ws.values[:, :, slot] = kv[:, 1, :, position]
        ws.slot_pos[:, :, slot] = position
        position += 1

    counts: dict[str, dict[str, int]] = {}
    for _ in range(4 * ws.plan.spill_every):  # warm up: appends that evict and close a segment
        step()
        if position - session.spilled_upto >= ws.plan.spill_every:
            session.append(position, None)
    for _ in range(ws.plan.spill_every):
        step()
    query, fresh = torch.randn(L, Hq, D, device=device), torch.randn(L, Hq, D, device=device)
    session.boundary(position, [], query)  # warm
    for name, call in (
        ("append", lambda: session.append(position, None)),
        ("boundary_same_query", lambda: session.boundary(position, [], query)),
        ("boundary_fresh_query", lambda: session.boundary(position, [], fresh)),
    ):
        with labelled_kernels(), profile(activities=activities) as prof:
            call()
        counts[name] = {**op_counts(prof), **op_times(prof)}
    # In-process wall time of a boundary (no gRPC): the same query, and alternating fresh ones.
    queries = [torch.randn(L, Hq, D, device=device) for _ in range(2)]
    for name, pick in (("boundary_same_query", lambda i: query), ("boundary_fresh_query", lambda i: queries[i % 2])):
        walls = []
        for i in range(24):
            q = pick(i)
            sync(device)
            t0 = time.perf_counter()
            session.boundary(position, [], q)
            walls.append(time.perf_counter() - t0)
        counts[name]["in_process_p50_us"] = round(1e6 * statistics.median(walls[4:]), 1)
    registry.close(session)
    host.close()
    return counts


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, H, Hq, D = args.layers, 8, 32, args.head_dim
    T = args.prompt
    spec = ModelSpec(L, H, Hq, D, dtype, max_tokens=T + args.steps + 64)
    host_gb = spec.max_tokens * L * 2 * H * D * (2 if dtype == torch.bfloat16 else 4) / 2**30 + 1
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "layout": {
            "layers": L,
            "kv_heads": H,
            "query_heads": Hq,
            "head_dim": D,
            "dtype": str(dtype),
            "prompt": T,
        },
        "budget": args.budget,
    }
    result["session_ops"] = args.session_ops
    extra = ["--session-ops", args.session_ops]
    with LocalDaemon(host_pool_gb=host_gb, device_pool_gb=2.0, device=str(device), extra_args=extra) as daemon:
        with KVRecallClient(daemon.target, "bench-worker", timeout=600) as client:
            session = client.open_session(spec, "louiskv", {"budget": args.budget}, device=device)
            kv = torch.randn(L, 2, H, T + args.steps, D, device=device, dtype=dtype)
            queries = torch.randn(L, Hq, 1, D, device=device, dtype=dtype)
            sync(device)
            started = time.perf_counter()
            ingest = session.ingest(kv[:, :, :, :T].contiguous(), queries)
            result["ingest_seconds"] = time.perf_counter() - started
            result["ingest_daemon_seconds"] = ingest.seconds
            result["units"] = ingest.units
            appends, same, fresh, gathered = [], [], [], []
            served: dict[str, list[float]] = {"same": [], "fresh": []}
            position = T
            for step in range(args.steps):
                session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                position += 1
                session.core.position = position
                if session.core.needs_append():
                    sync(device)
                    t0 = time.perf_counter()
                    session.append()
                    appends.append(time.perf_counter() - t0)
                if step % 4 == 0:
                    session.query.copy_(torch.randn_like(session.query))
                    sync(device)
                    t0 = time.perf_counter()
                    r = session.boundary()
                    fresh.append(time.perf_counter() - t0)
                    gathered.append(r.tokens_gathered)
                    served["fresh"].append(r.seconds)
                    t0 = time.perf_counter()
                    r = session.boundary()
                    same.append(time.perf_counter() - t0)
                    served["same"].append(r.seconds)
            result["append"] = percentiles(appends)
            result["boundary_same_query"] = percentiles(same)
            result["boundary_fresh_query"] = percentiles(fresh)
            # the daemon's own time per boundary (RetrievalResult.seconds: the handler's work,
            # worker-thread hop included; the rest of the round trip is gRPC and the client)
            result["boundary_same_query"]["daemon_p50_us"] = 1e6 * statistics.median(served["same"])
            result["boundary_fresh_query"]["daemon_p50_us"] = 1e6 * statistics.median(served["fresh"])
            result["fresh_rows_gathered_mean"] = statistics.fmean(gathered) if gathered else 0
            result["bytes_per_fresh_boundary"] = (
                result["fresh_rows_gathered_mean"] * 2 * D * (2 if dtype == torch.bfloat16 else 4)
            )
            result["session"] = str(session.stats()).replace("\n", " ")
            session.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--step-us", type=float, default=5100.0, help="decode step the shares are of (H200 `bound`, batch 1)"
    )
    parser.add_argument(
        "--ops", action="store_true", help="also profile op / launch / sync counts in-process"
    )
    parser.add_argument("--ops-only", action="store_true", help="only the in-process op counts (no daemon)")
    parser.add_argument(
        "--session-ops", choices=("thread", "inline"), default="thread",
        help="the daemon's --session-ops (inline: appends and boundaries on its event loop)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    result = {} if args.ops_only else run(args)
    if args.ops or args.ops_only:
        result["ops_per_operation"] = profile_ops(args)
    if not args.ops_only:
        # Share of one decode step (the `bound` step of the same model, measured by `kvrecall bench`).
        result["step_us"] = args.step_us
        for key in ("append", "boundary_same_query", "boundary_fresh_query"):
            result[key]["share_of_step"] = result[key]["p50_us"] / args.step_us
        result["append"]["per_token_share_of_step"] = result["append"]["share_of_step"] / 16
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    if not args.ops_only:
        print(f"{'what':28s} {'p50 us':>10s} {'p99 us':>10s} {'n':>5s} {'p50/step':>9s}")
        for key in ("append", "boundary_same_query", "boundary_fresh_query"):
            r = result[key]
            daemon = f"  (daemon {r['daemon_p50_us']:.0f})" if "daemon_p50_us" in r else ""
            print(f"{key:28s} {r['p50_us']:10.0f} {r['p99_us']:10.0f} {r['n']:5d} {r['share_of_step']:9.1%}{daemon}")
        print(
            f"ingest {result['ingest_seconds']:.2f}s for {args.prompt} tokens; {result['units']} units; "
            f"{result['fresh_rows_gathered_mean']:.0f} rows gathered per fresh boundary; step {args.step_us:.0f} us"
        )
    for name, counts in result.get("ops_per_operation", {}).items():
        print(f"{name:28s} " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
