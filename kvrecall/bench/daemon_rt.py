"""Boundary and append round trips through the real daemon (gRPC + working-set mapping).

`python -m kvrecall.bench.daemon_rt --out FILE [--device cuda:0] [--prompt 8192]` starts a
daemon process, opens a louiskv session of a Llama-3-8B-shaped layout (32 layers, 8 KV heads,
32 query heads, head dim 128, bf16 on CUDA / fp32 on CPU), ingests a random prompt through the
transport (CUDA IPC on a GPU, shared memory on a CPU), then times on the open Decode stream:
  * append notices (spill 16 tokens of all layers to the host tier),
  * boundaries with an unchanged query (scoring + top-k, nothing to gather: the RPC floor),
  * boundaries with a fresh random query (scoring + top-k + gather of the missing rows).
Prints p50/p99 and writes JSON with the device, versions, date and command.
"""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    L, H, Hq, D = args.layers, 8, 32, 128
    T = args.prompt
    spec = ModelSpec(L, H, Hq, D, dtype, max_tokens=T + args.steps + 64)
    host_gb = spec.max_tokens * L * 2 * H * D * (2 if dtype == torch.bfloat16 else 4) / 2**30 + 1
    result: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "layout": {"layers": L, "kv_heads": H, "query_heads": Hq, "head_dim": D, "dtype": str(dtype), "prompt": T},
        "budget": args.budget,
    }
    with LocalDaemon(host_pool_gb=host_gb, device_pool_gb=2.0, device=str(device)) as daemon:
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
                    t0 = time.perf_counter()
                    session.boundary()
                    same.append(time.perf_counter() - t0)
            result["append"] = percentiles(appends)
            result["boundary_same_query"] = percentiles(same)
            result["boundary_fresh_query"] = percentiles(fresh)
            result["fresh_rows_gathered_mean"] = statistics.fmean(gathered) if gathered else 0
            result["bytes_per_fresh_boundary"] = result["fresh_rows_gathered_mean"] * 2 * D * (2 if dtype == torch.bfloat16 else 4)
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
    args = parser.parse_args(argv)
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'what':28s} {'p50 us':>10s} {'p99 us':>10s} {'n':>5s}")
    for key in ("append", "boundary_same_query", "boundary_fresh_query"):
        r = result[key]
        print(f"{key:28s} {r['p50_us']:10.0f} {r['p99_us']:10.0f} {r['n']:5d}")
    print(f"ingest {result['ingest_seconds']:.2f}s for {args.prompt} tokens; {result['units']} units; "
          f"{result['fresh_rows_gathered_mean']:.0f} rows gathered per fresh boundary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
