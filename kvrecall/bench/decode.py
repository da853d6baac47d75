"""Part 3 (decode step per policy, context and batch) and part 4 (concurrency under a GPU KV cap).

Each step is captured once as a CUDA graph and timed by replaying it (median over replays,
CUDA events), so kernel launch gaps are those of a graph, as a serving engine would run it.
If capture fails the step is timed eagerly and the entry says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvrecall.bench.ceilings import HostPool
from kvrecall.bench.common import GiB, free_memory, log, time_fn
from kvrecall.bench.model import RandomLlama
from kvrecall.bench.policies import (
    DecodeStep,
    FullKV,
    HostKV,
    LouisKV,
    QuestHost,
    ResidentLayout,
    ResidentSet,
)
from kvrecall.engine.graph import GraphStep


@dataclass
class DecodeOptions:
    layout: ResidentLayout
    rates: list[float]  # boundary rates r to report
    measured_rate: float  # the rate taken as measured on the real model (CLI flag)
    page_overlap: float  # perstep-host-b: share of selected pages already resident each step
    boundary_miss: float  # louiskv: share of the selected clusters fetched at a boundary
    kv_mem_limit: int  # bytes of full-KV buffers allocated at most (beyond: layers share)
    plan_backend: str
    reps: int
    use_graph: bool
    deadline: float | None = None  # time.perf_counter() after which no new configuration starts


def _time_step(step: Callable[[], None], device: torch.device, opts: DecodeOptions) -> dict[str, Any]:
    runner = GraphStep(step, device, opts.use_graph)
    timing = time_fn(runner, device, warmup=3, reps=opts.reps)
    entry: dict[str, Any] = {"step_ms": timing.median_ms, "p10_ms": timing.p10_ms, "p90_ms": timing.p90_ms,
                             "reps": timing.reps, "graphed": runner.graphed}
    if runner.error:
        entry["graph_error"] = runner.error
    return entry


def _guarded(name: str, device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one policy measurement; an OOM or failure becomes the entry instead of ending the run."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": "out of memory", "detail": str(exc).splitlines()[0][:200]}
    except Exception as exc:
        log(f"    {name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        free_memory(device)


def measure_full(model: RandomLlama, batch: int, tokens: int, opts: DecodeOptions) -> dict[str, Any]:
    policy = FullKV(model.shape, batch, tokens, model.device, opts.kv_mem_limit)
    entry = _time_step(DecodeStep(model, policy, batch, tokens - 1), model.device, opts)
    entry.update(gpu_kv_bytes=policy.gpu_kv_bytes, allocated_kv_bytes=policy.allocated_bytes,
                 fits=not policy.emulated)
    if policy.emulated:
        entry["emulation"] = (f"{policy.gpu_kv_bytes / GiB:.0f} GiB of KV does not fit under the "
                              f"{opts.kv_mem_limit / GiB:.0f} GiB KV limit: {policy.kv_layers} layers' buffers are "
                              f"shared by all {model.shape.n_layers} layers (same bytes read per step)")
    return entry


def measure_bound(model: RandomLlama, batch: int, tokens: int, opts: DecodeOptions) -> dict[str, Any]:
    policy = ResidentSet(model.shape, opts.layout, batch, tokens, model.device)
    entry = _time_step(DecodeStep(model, policy, batch, tokens - 1), model.device, opts)
    entry.update(gpu_kv_bytes=policy.gpu_kv_bytes, resident_tokens=opts.layout.tokens)
    return entry


def measure_quest(model: RandomLlama, pool: HostPool, gather: Callable, batch: int, tokens: int,
                  opts: DecodeOptions, cached: bool) -> dict[str, Any]:
    host = HostKV(pool, model.shape, batch, tokens)
    policy = QuestHost(model.shape, opts.layout, batch, tokens, model.device, host, gather, cached,
                       opts.page_overlap, opts.plan_backend)
    entry = _time_step(DecodeStep(model, policy, batch, tokens - 1), model.device, opts)
    slots = policy.n_evict if cached else opts.layout.slots
    entry.update(gpu_kv_bytes=policy.gpu_kv_bytes, host_kv_bytes=host.logical_bytes, host_shared=host.shared,
                 host_bytes_per_step=model.shape.kv_bytes(batch, slots * opts.layout.unit),
                 pages_fetched_per_head_layer=slots)
    if cached:
        entry["page_overlap"] = opts.page_overlap
    entry["check"] = verify_quest(policy, host) if cached else "n/a"
    return entry


def measure_louiskv(model: RandomLlama, pool: HostPool, gather: Callable, batch: int, tokens: int,
                    opts: DecodeOptions) -> dict[str, Any]:
    host = HostKV(pool, model.shape, batch, tokens)
    policy = LouisKV(model.shape, opts.layout, batch, tokens, model.device, host, gather, opts.boundary_miss,
                     opts.plan_backend)
    plain_step = DecodeStep(model, policy, batch, tokens - 1)
    plain = _time_step(plain_step, model.device, opts)
    boundary = _time_step(DecodeStep(model, policy, batch, tokens - 1, extra=policy.retrieve), model.device, opts)
    fetched = round(opts.boundary_miss * opts.layout.slots) * opts.layout.unit
    rates = sorted({*opts.rates, opts.measured_rate})
    entry: dict[str, Any] = {
        "plain_step_ms": plain["step_ms"], "boundary_step_ms": boundary["step_ms"],
        "retrieval_ms": boundary["step_ms"] - plain["step_ms"],
        "avg_step_ms": _averages(plain["step_ms"], boundary["step_ms"], rates),
        "plain": plain, "boundary": boundary, "gpu_kv_bytes": policy.gpu_kv_bytes,
        "host_kv_bytes": host.logical_bytes, "host_shared": host.shared, "boundary_miss": opts.boundary_miss,
        "host_bytes_per_boundary": model.shape.kv_bytes(batch, fetched), "check": verify_louiskv(policy, host),
    }
    if policy.side_stream is not None:
        def overlapped() -> None:
            policy.start_overlapped_retrieval()
            plain_step()

        over = _time_step(overlapped, model.device, opts)
        entry.update(overlapped_boundary_step_ms=over["step_ms"], overlapped=over,
                     avg_step_ms_overlapped=_averages(plain["step_ms"], over["step_ms"], rates),
                     check_overlapped=verify_louiskv(policy, host))
    else:
        entry["overlapped"] = "skipped: needs CUDA streams"
    return entry


def _averages(plain_ms: float, boundary_ms: float, rates: list[float]) -> dict[str, float]:
    """Average step over a run where a fraction r of the steps is a boundary step."""
    return {f"{r:g}": (1 - r) * plain_ms + r * boundary_ms for r in rates}


def verify_louiskv(policy: LouisKV, host: HostKV, n_heads: int = 4) -> str:
    """After the timed replays: do sampled heads' retrieved slots hold their clusters' host rows?"""
    lay, shape = policy.layout, policy.shape
    heads_per_layer = policy.batch * shape.n_kv_heads
    table = policy.slot_table.cpu().view(shape.n_layers, heads_per_layer, lay.slots)
    kv_rows = policy.kv.view(-1, shape.head_dim)
    base = policy.host_base.cpu()
    offsets = policy.member_offsets.cpu()
    for flat in torch.linspace(0, shape.n_layers * heads_per_layer - 1, n_heads).long().tolist():
        layer, head = divmod(flat, heads_per_layer)
        units = table[layer, head]
        if (units < 0).any():
            return f"layer {layer} head {head}: empty slots after retrieval"
        for kv in range(2):
            want = host.rows(1).index_select(0, (base[layer, kv, head] + units[:, None] + offsets).reshape(-1))
            got = kv_rows.index_select(0, policy.dst_rows[layer, kv, head].reshape(-1)).cpu()
            if not torch.equal(want.view(torch.int16), got.view(torch.int16)):  # bitwise
                return f"layer {layer} head {head} kv {kv}: retrieved rows differ from host rows"
    return "ok"


def verify_quest(policy: QuestHost, host: HostKV, layer: int = 0) -> str:
    """Page-cache variant: do the resident slots of one layer hold their pages' host rows?"""
    lay, dim = policy.layout, policy.shape.head_dim
    table = policy.slot_table[layer].cpu()
    if (table < 0).any():
        return "empty slots after a step"
    src = (policy.host_base[:, layer].cpu() + table).reshape(-1)
    want = host.rows(lay.unit).index_select(0, src)
    got = policy.kv[layer].view(-1, lay.unit * dim).index_select(0, policy.dst_rows).cpu()
    return "ok" if torch.equal(want.view(torch.int16), got.view(torch.int16)) else "resident pages differ from host rows"


def measure_config(model: RandomLlama, pool: HostPool, gather: Callable | None, batch: int, tokens: int,
                   opts: DecodeOptions) -> dict[str, Any]:
    """Every policy at one (context, batch)."""
    device = model.device
    result: dict[str, Any] = {"context": tokens, "batch": batch, "policies": {}}
    policies = result["policies"]
    policies["full"] = _guarded("full", device, lambda: measure_full(model, batch, tokens, opts))
    policies["bound"] = _guarded("bound", device, lambda: measure_bound(model, batch, tokens, opts))
    if gather is None:
        result["skipped"] = "no working gather backend: host-backed policies not measured"
        return result
    policies["louiskv"] = _guarded("louiskv", device, lambda: measure_louiskv(model, pool, gather, batch, tokens, opts))
    for cached in (False, True):
        name = "perstep-host-b" if cached else "perstep-host-a"
        policies[name] = _guarded(name, device, lambda c=cached: measure_quest(model, pool, gather, batch, tokens,
                                                                                   opts, c))
    return result


LOUIS_VARIANTS = {"louiskv": "avg_step_ms", "louiskv-overlap": "avg_step_ms_overlapped"}


def derive_ratios(config: dict[str, Any], rates: list[float]) -> dict[str, Any]:
    """Ratios of one configuration, all from numbers of this run: for each rate r and each
    louiskv variant (retrieval after the step, or overlapped with the next step), its average
    step over the bound and the speedup of it over every baseline."""
    pol = config["policies"]
    louis = pol.get("louiskv", {})
    if "avg_step_ms" not in louis:
        return {}
    step = {name: p.get("step_ms") for name, p in pol.items()}
    out: dict[str, Any] = {}
    for r in rates:
        entry: dict[str, Any] = {}
        for variant, key in LOUIS_VARIANTS.items():
            if key not in louis:
                continue
            avg = louis[key][f"{r:g}"]
            entry[f"{variant}_step_ms"] = avg
            if step.get("bound"):
                entry[f"{variant}_over_bound"] = avg / step["bound"]
            for base in ("full", "perstep-host-a", "perstep-host-b"):
                if step.get(base):
                    entry[f"{variant}_speedup_vs_{base}"] = step[base] / avg
        out[f"r={r:g}"] = entry
    full_bytes = pol.get("full", {}).get("gpu_kv_bytes")
    if full_bytes:
        out["louiskv_gpu_kv_fraction_of_full"] = louis["gpu_kv_bytes"] / full_bytes
    return out


def bench_decode(model: RandomLlama, pool: HostPool, gather: Callable | None, contexts: list[int],
                 batches: list[int], opts: DecodeOptions) -> dict[str, Any]:
    """Part 3 over the grid of contexts and batches."""
    rates = sorted({*opts.rates, opts.measured_rate})
    configs = []
    for tokens in contexts:
        for batch in batches:
            if opts.deadline is not None and time.perf_counter() > opts.deadline:
                log(f"  decode T={tokens} B={batch}: skipped (time budget)")
                configs.append({"context": tokens, "batch": batch, "policies": {}, "skipped": "time budget"})
                continue
            log(f"  decode T={tokens} B={batch}")
            config = measure_config(model, pool, gather, batch, tokens, opts)
            config["ratios"] = derive_ratios(config, rates)
            configs.append(config)
            log("    " + _one_line(config, opts.measured_rate))
    return {"configs": configs, "rates": rates, "measured_rate": opts.measured_rate}


def _one_line(config: dict[str, Any], rate: float) -> str:
    parts = []
    for name, p in config["policies"].items():
        ms = p.get("step_ms", p.get("avg_step_ms", {}).get(f"{rate:g}"))
        parts.append(f"{name}={ms:.2f}ms" if ms is not None else f"{name}=({p.get('error', 'n/a')})")
    return " ".join(parts)


def bench_concurrency(model: RandomLlama, pool: HostPool, gather: Callable | None, tokens: int, gpu_cap: int,
                      host_cap: int, opts: DecodeOptions) -> dict[str, Any]:
    """Part 4: sustained tokens/s under a GPU KV cap, full (as many sequences as fit) vs louiskv."""
    shape, device = model.shape, model.device
    rate = opts.measured_rate
    full_seq = shape.kv_bytes(1, tokens)
    louis_seq = LouisKV.gpu_bytes_per_sequence(shape, opts.layout, tokens)
    n_full = gpu_cap // full_seq
    n_louis_gpu = gpu_cap // louis_seq
    n_louis_host = host_cap // full_seq
    out: dict[str, Any] = {
        "context": tokens, "gpu_kv_cap_bytes": gpu_cap, "host_pool_cap_bytes": host_cap, "rate": rate,
        "full": {"sequences": n_full, "gpu_bytes_per_sequence": full_seq},
        "louiskv": {"gpu_bytes_per_sequence": louis_seq, "host_bytes_per_sequence": full_seq,
                    "sequences_gpu_limit": n_louis_gpu, "sequences_host_limit": n_louis_host},
    }
    if n_full >= 1:
        log(f"  concurrency full B={n_full}")
        entry = _guarded("full", device, lambda: measure_full(model, n_full, tokens, opts))
        out["full"].update(entry)
        if "step_ms" in entry:
            out["full"]["tokens_per_s"] = n_full / (entry["step_ms"] * 1e-3)
    if gather is None:
        out["skipped"] = "no working gather backend"
        return out
    batches = {"host_limited": min(n_louis_gpu, n_louis_host)}
    if n_louis_gpu > n_louis_host:
        batches["gpu_limited"] = n_louis_gpu
    for label, batch in batches.items():
        log(f"  concurrency louiskv ({label}) B={batch}")
        entry = _guarded("louiskv", device, lambda b=batch: measure_louiskv(model, pool, gather, b, tokens, opts))
        entry["sequences"] = batch
        for suffix, key in (("", "avg_step_ms"), ("_overlapped", "avg_step_ms_overlapped")):
            if key not in entry:
                continue
            entry[f"tokens_per_s{suffix}"] = batch / (entry[key][f"{rate:g}"] * 1e-3)
            if out["full"].get("tokens_per_s"):
                entry[f"speedup_vs_full{suffix}"] = entry[f"tokens_per_s{suffix}"] / out["full"]["tokens_per_s"]
        out["louiskv"][label] = entry
    out["note"] = ("host_limited: as many sequences as the pinned host pool cap holds (the issue's rule); "
                   "gpu_limited: as many as the GPU cap holds, host KV emulated by sharing the pool.")
    return out
