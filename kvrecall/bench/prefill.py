"""Prefill memory and time through the real product path: transformers' full KV vs kvrecall.

`python -m kvrecall.bench.prefill --out FILE [--device cuda] [--layers 32] [--contexts 32768,131072]
[--chunk 4096] [--budget 1024] [--steps 64]` builds a transformers LlamaForCausalLM with random
weights at the Llama-3-8B shape (bf16 on CUDA; `--shape tiny`, the CPU default, for a smoke
run), starts a local daemon on the same device, and per context measures

* full: transformers' own KV (DynamicCache, SDPA): prefill in one pass, then `--steps` greedy
  decode steps; twice (full_first, then full: the warm baseline the ratios use);
* kvrecall: KVRecallCache over a louiskv session (budget `--budget`, the prompt layer by layer,
  projections and MLP in chunks of `--chunk` tokens, each layer's K/V streamed to the daemon),
  the same decode steps; twice, the first session at this context and a second (warm) one;

reporting the worker's peak GPU memory above the weights over prefill + decode
(torch.cuda.max_memory_allocated, plus the staging buffers, which are cudaMalloc'd outside
torch's allocator: an upper bound), the daemon's GPU bytes for the session (GetStats:
working set + policy metadata), and prefill wall time. Prints a table and writes JSON.
Timing numbers on a CPU are not meaningful; the CPU run checks the path and the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvrecall.bench.common import GiB, free_memory, log, run_metadata, sync
from kvrecall.bench.model import LLAMA3_8B, TINY, ModelShape

SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}


def build_model(shape: ModelShape, layers: int, device: torch.device, dtype: torch.dtype, positions: int):
    """A random-weight transformers LlamaForCausalLM of `shape` with `layers` layers, made on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=layers,
        num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=positions, rope_theta=500000.0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def peak_bytes(device: torch.device, start: int) -> int:
    if device.type != "cuda":
        return 0
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; returns the bytes allocated now (the weights and inputs)."""
    if device.type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, position: int, steps: int, device: torch.device) -> float:
    """`steps` greedy decode steps after a prefill; returns the mean seconds per step."""
    from kvrecall.worker import decode_step

    started = time.perf_counter()
    for step in range(steps):
        logits = decode_step(model, cache, int(logits.argmax()), position + step, device)
    sync(device)
    return (time.perf_counter() - started) / max(1, steps)


@torch.no_grad()
def run_full(model, ids: torch.Tensor, steps: int, device: torch.device) -> dict[str, Any]:
    from transformers import DynamicCache

    model.set_attn_implementation("sdpa")
    start = reset_peak(device)
    began = time.perf_counter()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - began
    step_s = greedy(model, cache, out.logits[0, -1], ids.shape[1], steps, device)
    result = {"prefill_s": prefill_s, "decode_ms_per_step": 1e3 * step_s, "peak_worker_bytes": peak_bytes(device, start)}
    del cache, out
    free_memory(device)
    return result


class CallTimes:
    """Seconds the worker spent inside each kind of session call (`--profile`): wraps the
    session's methods in place. A call also waits for GPU work queued before it, so read
    these as where the prefill waited, not as the daemon's own time."""

    def __init__(self, session) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        for name in ("boundary", "chunk", "flush", "append"):
            setattr(session, name, self._timed(name, getattr(session, name)))
        open_stream = session.prompt_stream

        def prompt_stream(num_tokens: int):
            stream = open_stream(num_tokens)
            stream.send = self._timed("ingest.send", stream.send)
            stream.finish = self._timed("ingest.finish", stream.finish)
            return stream

        session.prompt_stream = prompt_stream

    def _timed(self, name: str, call):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed

    def report(self) -> dict[str, dict[str, float]]:
        return {name: {"seconds": self.seconds[name], "calls": self.calls[name]} for name in sorted(self.seconds)}


@torch.no_grad()
def run_kvrecall(model, client, ids: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kvrecall.client.core import fit_to_sequence
    from kvrecall.client.hf import KVRecallCache, prefill, spec_for, use_kvrecall_attention
    from kvrecall.client.staging import STAGED

    T = ids.shape[1]
    spec = spec_for(model, T + args.steps + 64)
    config = fit_to_sequence({"budget": args.budget}, spec.max_tokens)  # the daemon refuses a budget past it
    with client.open_session(spec, "louiskv", config, tag="bench-prefill") as session:
        use_kvrecall_attention(model)
        times = CallTimes(session) if args.profile else None
        cache = KVRecallCache(session, chunk_tokens=args.chunk)
        start = reset_peak(device)
        STAGED.reset()
        began = time.perf_counter()
        logits = prefill(model, cache, ids)
        sync(device)
        prefill_s = time.perf_counter() - began
        prefill_calls = times.report() if times is not None else None
        step_s = greedy(model, cache, logits, T, args.steps, device)
        torch_peak = peak_bytes(device, start)
        stats = session.stats()
        result = {
            "prefill_s": prefill_s, "decode_ms_per_step": 1e3 * step_s,
            "peak_worker_bytes": torch_peak + (STAGED.peak if device.type == "cuda" else 0),
            "peak_worker_torch_bytes": torch_peak, "peak_staging_bytes": STAGED.peak,
            "daemon_device_bytes": stats.device_bytes, "daemon_metadata_bytes": stats.metadata_bytes,
            "daemon_host_bytes": stats.host_bytes, "boundaries": stats.boundaries, "units": stats.units,
        }  # fmt: skip
        if prefill_calls is not None:
            result["prefill_calls"] = prefill_calls
    del cache
    free_memory(device)
    return result


def profiled(device: torch.device, run, *args) -> dict[str, Any]:
    """run(*args) under torch.profiler: the top GPU kernels by total time (a table) and the sum of
    the kernels' own time (prefill and decode steps together). Only the kernels' own events
    count: an aten op's device time is its kernels' again (the table's "Self CUDA time total")."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(*args)
    averages = prof.key_averages()
    return {
        "gpu_kernel_s": sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / 1e6,
        "top": averages.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from kvrecall.client import KVRecallClient
    from kvrecall.local import LocalDaemon

    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    layers = args.layers or shape.n_layers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = [int(c) for c in args.contexts.split(",")]
    model = build_model(shape, layers, device, dtype, max(contexts) + args.steps + 128)
    token_bytes = 2 * layers * shape.n_kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    host_gb = max(1.0, 1.25 * (max(contexts) + args.steps + 128) * token_bytes / GiB)
    daemon_args = ["--warmup", args.daemon_warmup, "--page-kb", str(args.page_kb)]
    results: dict[str, Any] = {"contexts": {}}
    started = time.perf_counter()
    daemon = LocalDaemon(host_pool_gb=host_gb, device_pool_gb=args.device_pool_gb, device=str(device),
                         extra_args=daemon_args)  # fmt: skip
    daemon.start(timeout=900.0)  # pinning a large host tier and the kernel warm-up take minutes
    try:
        results["daemon_start_s"] = time.perf_counter() - started
        with KVRecallClient(daemon.target, "bench-prefill", timeout=600.0) as client:
            for T in contexts:
                ids = torch.randint(0, shape.vocab, (1, T), generator=torch.Generator().manual_seed(T)).to(device)
                # full's first run also pays the worker process's one-time costs (cuDNN builds
                # its attention kernels at first use), so kvrecall's first session after daemon
                # start measures what the daemon adds
                log(f"context {T}: full KV (first) ...")
                full_first = run_full(model, ids, args.steps, device)
                log(f"context {T}: kvrecall (first session) ...")
                first = run_kvrecall(model, client, ids, args, device)
                log(f"context {T}: kvrecall (warm) ...")
                warm = run_kvrecall(model, client, ids, args, device)
                log(f"context {T}: full KV (warm) ...")
                full = run_full(model, ids, args.steps, device)
                if args.kernels:  # diagnosis only: a profiled run of each, after the timed ones
                    log(f"context {T}: profiled kvrecall and full prefills ...")
                    results.setdefault("kernels", {})[str(T)] = {
                        "kvrecall": profiled(device, run_kvrecall, model, client, ids, args, device),
                        "full": profiled(device, run_full, model, ids, args.steps, device),
                    }
                full_kv = token_bytes * (T + args.steps)
                results["contexts"][str(T)] = {
                    "full_first": full_first, "full": full, "kvrecall_first": first, "kvrecall": warm,
                    "full_kv_bytes": full_kv,
                    "ratios": {
                        "worker_peak_vs_full": warm["peak_worker_bytes"] / full["peak_worker_bytes"]
                        if full["peak_worker_bytes"] else None,
                        "daemon_device_vs_full_kv": warm["daemon_device_bytes"] / full_kv,
                        "prefill_warm_vs_full": warm["prefill_s"] / full["prefill_s"],
                        "prefill_first_vs_full": first["prefill_s"] / full["prefill_s"],
                    },
                }  # fmt: skip
    finally:
        daemon.stop()
    results["config"] = {
        "shape": args.shape, "layers": layers, "dtype": str(dtype).removeprefix("torch."), "contexts": contexts,
        "chunk": args.chunk, "budget": args.budget, "steps": args.steps, "policy": "louiskv",
        "daemon_warmup": args.daemon_warmup, "profile": args.profile,
    }  # fmt: skip
    results["notes"] = (
        "kvrecall_first: the first session at that context (for the first context, the first after daemon "
        "start); kvrecall: a second, warm one. full_first / full: transformers' one-pass prefill, first and "
        "second run at that context; the ratios divide by the second. peak_worker_bytes: torch's peak above the weights plus the peak "
        "of the cudaMalloc'd staging buffers (an upper bound). daemon_device_bytes: working set + policy metadata."
    )
    return results


def table(results: dict[str, Any]) -> str:
    gib = 1 / GiB
    lines = ["== prefill: worker peak GPU GiB above weights / daemon GPU GiB / prefill s (first, warm)",
             f"{'context':>8} {'full peak':>10} {'kvr peak':>9} {'ratio':>6} {'daemon':>7} {'%full KV':>8} "
             f"{'full s':>7} {'kvr s 1st':>9} {'kvr s':>7}"]
    for T, r in results["contexts"].items():
        full, ours, first = r["full"], r["kvrecall"], r["kvrecall_first"]
        ratio = r["ratios"]["worker_peak_vs_full"]
        lines.append(
            f"{T:>8} {full['peak_worker_bytes'] * gib:>10.2f} {ours['peak_worker_bytes'] * gib:>9.2f} "
            f"{ratio if ratio is not None else float('nan'):>6.2f} {ours['daemon_device_bytes'] * gib:>7.2f} "
            f"{100 * r['ratios']['daemon_device_vs_full_kv']:>8.1f} {full['prefill_s']:>7.2f} "
            f"{first['prefill_s']:>9.2f} {ours['prefill_s']:>7.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvrecall.bench.prefill", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: llama3-8b on CUDA, tiny on CPU)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    parser.add_argument("--contexts", default="32768,131072", help="comma-separated prompt lengths")
    parser.add_argument("--chunk", type=int, default=4096, help="kvrecall prefill chunk, tokens")
    parser.add_argument("--budget", type=int, default=1024, help="louiskv retrieved tokens per layer and KV head")
    parser.add_argument("--steps", type=int, default=64, help="decode steps after the prefill")
    parser.add_argument("--device-pool-gb", type=float, default=16.0, help="the daemon's device pool")
    parser.add_argument("--page-kb", type=int, default=2048, help="the daemon's host page size")
    parser.add_argument("--profile", action="store_true", help="record the seconds prefill spent in each kind of daemon call")
    parser.add_argument("--kernels", action="store_true", help="after the timed runs, profile one of each: top GPU kernels")
    parser.add_argument("--daemon-warmup", default="bfloat16:128", help="the daemon's --warmup ('' = none)")
    args = parser.parse_args(argv)
    if args.shape is None:
        args.shape = "llama3-8b" if args.device.startswith("cuda") else "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    results = measure(args)
    results["meta"] = run_metadata(torch.device(args.device), ["prefill", *argv])
    print(table(results), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
