"""`kvrecall bench e2e`: decode through the real product path, against the best full-KV step.

kvrecall rows: the engine (kvrecall/engine) decodes B sequences, each its own session of a
real daemon process (CUDA IPC working sets, pinned host tier), one graph-captured step for all
of them, then the step's AppendNotices and boundary retrievals over gRPC. Each step is timed
on the host clock around `Engine.step()` (it ends with the step's only sync), so the daemon's
answers are inside the figure.

full rows: the same engine and weights with every token's K/V on the GPU, attention by torch
SDPA's GQA kernel over the live length, the step captured as a CUDA graph and timed by replay
with CUDA events (engine/full.py).

Random weights: the prompt's KV is random (ingested as it is, not prefilled), and queries drift
on every step, so the boundary decision is set by a schedule at a given rate (`--rates`; the
rate measured on the real model is 11.7%, docs/TUNING.md); the device still computes its flag
in every step. `bound` is the same engine at rate 0 (appends only): the sparse step's floor.
Prints a table, writes JSON (rewritten after every configuration) and a PNG.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from dataclasses import replace
from typing import Any

import torch

from kvrecall import gcfreeze
from kvrecall.bench.common import GiB, log, run_metadata, time_fn
from kvrecall.bench.host_probe import host_probe
from kvrecall.bench.worker_selection import WorkerSelection
from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.engine import LLAMA3_8B, DecoderShape, DecoderWeights, Engine
from kvrecall.engine.decoder import Decoder
from kvrecall.engine.engine import (
    DEFAULT_LAG,
    EMBEDDED_SWITCH_INTERVAL_S,
    SWITCH_INTERVAL_S,
    SWITCHES,
    DaemonTimes,
)
from kvrecall.engine.full import FullKV
from kvrecall.engine.graph import GraphStep
from kvrecall.local import LocalDaemon
from kvrecall.prefix import declare
from kvrecall.server.config import cpu_set
from kvrecall.server.embedded import EmbeddedDaemon

TINY = DecoderShape(2, 256, 4, 2, 64, 512, 1000)
MEASURED_RATE = 0.117  # louiskv's boundary rate on the real model at the default threshold (docs/TUNING.md)
PARTS = ("step", "capped", "many")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvrecall bench e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=("llama3-8b", "tiny"), default="llama3-8b", help="model shape (random weights)")
    p.add_argument("--layers", type=int, help="override the shape's layer count (quick runs)")
    p.add_argument("--contexts", default="32768,131072", help="prompt tokens, comma-separated")
    p.add_argument("--batches", default="1,8", help="sequences per step, comma-separated")
    p.add_argument("--policies", default="louiskv,quest", help="kvrecall policies beside full")
    p.add_argument("--rates", default=f"0,{MEASURED_RATE},1", help="louiskv boundary rates (share of steps)")
    p.add_argument("--schedule", choices=("even", "random"), default="even",
                   help="when a louiskv slot crosses: every 1/rate steps from a random phase per slot (even), or "
                   "with probability rate each step (random: a slot reading its shadow cannot cross, so the share "
                   "of steps that retrieve comes out below rate at lag > 0)")
    p.add_argument("--query-drift", type=_drift, default=1.0,
                   help="emulation: a forced crossing retrieves for q_r = q_prev + DRIFT * (q - q_prev), q_prev the "
                   "slot's last retrieval query (1: this step's query, so random weights choose a fresh set every "
                   "time and move ~96%% of a budget; the real model's retrievals move ~20%%, scripts/lag_fidelity.py "
                   "moved_share); rows report moved_share")
    p.add_argument("--budget", type=int, default=1024, help="retrieved tokens per layer and KV head")
    p.add_argument("--steps", type=int, default=64, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=24, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1,
                   help="kvrecall rows: time this many blocks of --steps steps one after another on the same sessions "
                   "and report each block's mean (mean_ms_blocks) and max/min (block_spread) beside the overall figures")
    p.add_argument("--lag", default=str(DEFAULT_LAG),
                   help="steps a slot reads its shadow while the daemon retrieves (0: retrieval blocks the next "
                   "step); comma-separated: each louiskv rate above 0 is measured at every lag")
    p.add_argument("--switch-interval-ms", default="",
                   help="the interpreter's thread switch interval (default: the engine's, 0.5 ms; 0.2 ms with "
                   "--daemon embedded); comma-separated: each louiskv rate above 0 is measured at every value (and lag)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--capped-context", type=int, default=32768, help="context of the capped-GPU-KV throughput part")
    p.add_argument("--gpu-kv-cap-gib", type=float, default=16.0, help="GPU KV cap of that part")
    p.add_argument("--host-cap-gib", type=float, default=100.0, help="host tier the capped and many parts may use")
    p.add_argument("--many", type=int, default=64, help="sequences of the daemon-sustain part")
    p.add_argument("--many-context", type=int, default=8192, help="their prompt tokens")
    p.add_argument("--host-pool-gib", type=float, default=None,
                   help="daemon host tier (default: what the largest configuration needs); configurations that do "
                   "not fit are skipped and listed under skipped")
    p.add_argument("--no-graph", action="store_true", help="run steps eagerly")
    p.add_argument("--notices", choices=("deferred", "taken", "waited"), default="deferred",
                   help="deferred: sessions opened with deferred eviction (the step never waits for an "
                        "AppendNotice; a crossing slot's retrieval follows its last notice in the daemon); taken: "
                        "the same, but a crossing slot takes its last notice's answer first (before 2026-12-01's "
                        "StepEvent.follows); waited: each step waits for its notices")
    p.add_argument("--host-copies", choices=("copy", "kernel"), default="copy",
                   help="copy: the engine's slot tables reach the GPU and each step's tokens / flags the host by the "
                        "copy engine (a small copy can queue behind the daemon's transfers); kernel: by kernels inside "
                        "the step (Engine host_copies)")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="on: each step is launched before the host work of the one before (Engine overlap: the "
                        "boundary flags, notices, retrievals and shadow switches run while the GPU decodes; the "
                        "serve path's default); auto (default): on where the engine can (deferred notices, every "
                        "--lag >= 1, --host-copies copy), else off")
    p.add_argument("--switch", choices=SWITCHES, default="fixed",
                   help="fixed: a crossed slot reads its shadow for exactly --lag steps (deterministic); answered: "
                        "it switches as soon as its retrieval is answered, after --lag steps at the latest; patient: "
                        "after --lag steps once answered, 2 x --lag at the latest, so a late answer rarely "
                        "stalls the batch; adaptive: after exactly as many steps as the recent retrievals' answers "
                        "needed (their 90th percentile), --lag to 2 x --lag (Engine switch)")
    p.add_argument("--daemon-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the daemon process only (repeatable), e.g. "
                   "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=20 under CUDA MPS, KVRECALL_HOST_READS=kernel")
    p.add_argument("--shared-prompt", action="store_true",
                   help="step part: a configuration's sequences share one prompt document (the first declares it "
                   "as a prefix and ingests it, the others open over the held prefix: one host copy, as when "
                   "many requests ask about one document). Their decode work is the same (each its own working "
                   "set, boundaries, retrievals and output pages); the host tier holds the prompt once, so e.g. "
                   "128K x 8 fits a 128 GiB host. Rows say shared_prompt")
    p.add_argument("--worker-cpus", default="",
                   help="CPUs the worker's thread runs on once the daemon has started, e.g. 0-7 (beside "
                   "--daemon-env KVRECALL_CPUS=8-15: the two kept off each other's cores); default: all")
    p.add_argument("--gc-freeze", choices=("on", "off"), default="on",
                   help="freeze the interpreter's objects for each timed configuration (kvrecall/gcfreeze.py, as "
                   "`kvrecall worker --serve` does once ready): a full garbage collection, which stops every thread "
                   "of the process, then walks only what the steps make")
    p.add_argument("--daemon", choices=("process", "embedded"), default="process",
                   help="process (default): the daemon as a process of its own, as `kvrecall serve` runs it; "
                   "embedded: on a thread of this process (kvrecall.server.embedded: its kernels run in the "
                   "worker's CUDA context instead of time-slicing with it; --daemon-env takes KVRECALL_* settings "
                   "only, and the worker's peak GPU memory then includes the daemon's temporaries)")
    p.add_argument("--daemon-log", default="", metavar="PATH",
                   help="keep the daemon's log at PATH (default: a temporary file, removed after a clean stop)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing each louiskv rate above 0, run this many more steps under cProfile and add "
                   "the host functions that took longest to the row (host_profile)")
    p.add_argument("--worker-kernel-steps", type=int, default=0,
                   help="after timing each louiskv rate, run this many more steps under torch.profiler (CUDA "
                   "activity) in this process and add the worker's kernels per step to the row (worker_kernels): "
                   "which of the step's kernels a boundary makes longer")
    p.add_argument("--worker-selection", action="store_true",
                   help="an EMULATION (kvrecall/bench/worker_selection.py): after each step's retrievals are sent, "
                   "the worker itself runs louiskv's selection kernels for every crossed slot over a synthetic unit "
                   "table of the context's size, on a high-priority stream of its own, and discards the result; with "
                   "--daemon-env KVRECALL_DRY_RETRIEVALS=1 a step at 11.7%% then pays what selecting in the worker's "
                   "context would cost it (louiskv rows say worker_selection)")
    p.add_argument("--out", default="e2e.json")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _gib(n: float) -> float:
    return round(n / GiB, 3)


class Bench:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.device = torch.device(args.device)
        shape = LLAMA3_8B if args.shape == "llama3-8b" else TINY
        if args.layers:
            shape = replace(shape, num_layers=args.layers)
        self.shape = shape
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.weights = DecoderWeights.random(shape, self.device, dtype)
        self.rows: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.meta = run_metadata(self.device, argv)
        self.meta["command"] = " ".join(["kvrecall", "bench", "e2e", *argv])
        self.meta["schedule"] = args.schedule
        self.meta["notices"] = args.notices
        self.meta["host_copies"] = args.host_copies
        self.overlap = _overlap(args)
        self.meta["overlap"] = self.overlap
        self.meta["switch"] = args.switch
        self.meta["daemon"] = args.daemon
        self.meta["gc_freeze"] = args.gc_freeze == "on"
        self.switch_interval = EMBEDDED_SWITCH_INTERVAL_S if args.daemon == "embedded" else SWITCH_INTERVAL_S
        self.meta["switch_interval_ms"] = round(self.switch_interval * 1e3, 3)
        self.meta["query_drift"] = args.query_drift
        self.meta["weights_gib"] = _gib(self.weights.nbytes)
        self.token_bytes = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * torch.finfo(dtype).bits // 8

    # ---- helpers -------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def worker_peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return _gib(torch.cuda.max_memory_allocated(self.device) - self.weights.nbytes)

    def prompt(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random prompt KV [L, 2, H, T, D] and observation queries [L, Hq, 16, D]."""
        s = self.shape
        g = torch.Generator(device=self.device).manual_seed(tokens)
        kv = torch.randn(s.num_layers, 2, s.num_kv_heads, tokens, s.head_dim, device=self.device,
                         dtype=self.dtype, generator=g)  # fmt: skip
        queries = torch.randn(s.num_layers, s.num_query_heads, 16, s.head_dim, device=self.device,
                              dtype=self.dtype, generator=g)  # fmt: skip
        return kv, queries

    def host_tokens(self, context: int, batch: int) -> int:
        """Tokens the daemon's host tier holds for a step configuration: the prompts (one with
        --shared-prompt) and every session's room for its output."""
        return context * (1 if self.args.shared_prompt else batch) + batch * self.spec(0).max_tokens

    def spec(self, tokens: int) -> ModelSpec:
        s = self.shape
        steps = self.args.steps * self.args.repeats * 4 + self.args.warmup * 4 + 64
        return ModelSpec(s.num_layers, s.num_kv_heads, s.num_query_heads, s.head_dim, self.dtype, tokens + steps)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        log("  " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("part",)))
        self.write()

    def write(self) -> None:
        with open(self.args.out, "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows, "errors": self.errors, "notes": NOTES}, f, indent=1)

    # ---- full KV on the GPU --------------------------------------------------------------------
    def full(self, part: str, context: int, batch: int) -> dict[str, Any]:
        s, args = self.shape, self.args
        self.free()
        max_tokens = context + 4 * (args.steps + args.warmup) + 8
        per_layer = 2 * batch * s.num_kv_heads * max_tokens * s.head_dim * self.dtype.itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            kv_layers = max(1, min(s.num_layers, int((free - 6 * GiB) * 0.9 // per_layer)))
        else:
            kv_layers = s.num_layers
        backend = FullKV(batch, s.num_layers, s.num_kv_heads, s.head_dim, max_tokens, self.dtype, self.device,
                         s.head_dim**-0.5, kv_layers)  # fmt: skip
        backend.keys.normal_()
        backend.values.normal_()
        backend.live = context
        decoder = Decoder(self.weights, batch)
        decoder.positions.fill_(context - 1)
        step = GraphStep(lambda: decoder.step(backend), self.device, not args.no_graph)
        decoder.positions.fill_(context - 1)
        timing = time_fn(step, self.device, warmup=args.warmup, reps=args.steps)
        row = {
            "part": part, "policy": "full", "context": context, "batch": batch, "rate": None,
            "median_ms": round(timing.median_ms, 3), "p90_ms": round(timing.p90_ms, 3),
            "mean_ms": round(timing.median_ms, 3), "tokens_per_s": round(batch * 1e3 / timing.median_ms, 1),
            "graphed": step.graphed, "kv_layers": kv_layers, "kv_layers_shared": kv_layers < s.num_layers,
            "gpu_kv_gib": _gib(batch * context * self.token_bytes), "worker_peak_gib": self.worker_peak(),
            "daemon_gpu_gib": 0.0,
        }  # fmt: skip
        return row

    # ---- kvrecall sessions through the daemon ---------------------------------------------------------
    def sessions(
        self, client: KVRecallClient, part: str, policy: str, context: int, batch: int, rates: list[float]
    ) -> list[dict[str, Any]]:
        args = self.args
        self.free()
        config = {} if policy in ("full", "streaming") else {"budget": args.budget}
        kv, queries = self.prompt(context)
        rate_now = [0.0]

        slot_phase = [random.Random(slot).random() for slot in range(batch)]
        drifted: dict[str, torch.Tensor] = {}  # --query-drift: each session's last retrieval query (float)

        def crosses(step: int, slot: int) -> bool:
            rate = rate_now[0]
            if args.schedule == "random":
                return random.Random(step * 100_003 + slot).random() < rate
            x = step * rate + slot_phase[slot]  # evenly spaced, one boundary per 1/rate steps, phase per slot
            return math.floor(x) > math.floor(x - rate)

        def schedule(step: int, slot: int) -> bool:
            crossing = crosses(step, slot)
            if crossing and args.query_drift < 1.0 and engine is not None:
                core = engine.sequences[slot].session.core
                drift_query(core.query, drifted, core.session_id, args.query_drift)
            return crossing

        opened = []
        engine = None
        try:
            t0 = time.perf_counter()
            # --shared-prompt: one document for all; the first session's ingest registers it as a prefix
            # and the others open over it (opened as their slots fill, below)
            shared = args.shared_prompt and part == "step"
            prefix = declare(list(range(context)), f"kvrecall-bench-e2e:{self.shape}:{self.dtype}") if shared else None

            def open_one():
                return client.open_session(self.spec(context), policy, config, device=self.device,
                                           deferred_eviction=args.notices != "waited", prefix=prefix)  # fmt: skip

            for _ in range(1 if shared else batch):
                opened.append(open_one())
            capacity = opened[0].capacity
            force = schedule if policy == "louiskv" else None
            lags = _ints(args.lag)
            engine = Engine(self.weights, batch, capacity, use_graph=not args.no_graph, force_boundary=force, lag=lags[0],
                            follow_notices=args.notices != "taken", host_copies=args.host_copies,
                            overlap=self.overlap, switch=args.switch)  # fmt: skip
            if args.worker_selection and policy == "louiskv":
                engine.on_crossings = WorkerSelection(self.device, context, config["budget"],
                                                      rows=self.shape.num_layers * self.shape.num_kv_heads,
                                                      groups=self.shape.num_query_heads // self.shape.num_kv_heads,
                                                      head_dim=self.shape.head_dim, dtype=self.dtype)  # fmt: skip
            first = torch.randint(0, self.shape.vocab, (batch,)).tolist()
            ingest = []
            for slot, token in enumerate(first):
                t1 = time.perf_counter()
                if slot == len(opened):  # (shared: over the prefix the first session's ingest registered)
                    opened.append(open_one())
                    if opened[-1].prefix_held != context:
                        raise RuntimeError(f"--shared-prompt: the daemon held {opened[-1].prefix_held} of {context} tokens")
                engine.add(opened[slot], kv=kv, queries=queries, first_token=token)
                ingest.append(time.perf_counter() - t1)
            del kv, queries
            setup_s = time.perf_counter() - t0
            self.free()
            stats = client.stats()
            daemon_device = next(p.used_bytes for p in stats.pools if p.tier == "device")
            host_bytes = next(p.used_bytes for p in stats.pools if p.tier == "host")
            rows = []
            switches = [float(x) / 1e3 for x in args.switch_interval_ms.split(",") if x] or [self.switch_interval]
            phases = [(rate, lag, sw) for rate in rates for lag in (lags if rate > 0 else lags[:1])
                      for sw in (switches if rate > 0 else switches[:1])] \
                if policy == "louiskv" else [(1.0 if policy == "quest" else 0.0, lags[0], switches[0])]  # fmt: skip
            # setup's objects out of the timed steps' full collections (unfrozen after them)
            with gcfreeze.frozen(args.gc_freeze == "on"):
                for rate, lag, switch in phases:
                    rate_now[0] = rate
                    engine.set_lag(lag)
                    sys.setswitchinterval(switch)
                    for _ in range(args.warmup):
                        engine.step()
                    before = sum(seq.boundaries for seq in engine.active)
                    choices_before = engine.worker_choices
                    engine.times.clear()
                    samples, blocks = [], []
                    with gcfreeze.Pauses() as pauses:  # the collector's passes in the timed steps (any thread)
                        for _ in range(args.repeats):  # blocks of `steps` steps, one after another
                            block = []
                            for _ in range(args.steps):
                                t1 = time.perf_counter()
                                engine.step()
                                block.append((time.perf_counter() - t1) * 1e3)
                            samples += block
                            blocks.append(statistics.fmean(block))
                    crossed = sum(seq.boundaries for seq in engine.active) - before
                    waits = daemon_waits(engine.times)
                    if engine.times.moved_bytes and crossed and config.get("budget"):  # of a whole budget per retrieval
                        whole = config["budget"] * self.token_bytes
                        waits["moved_share"] = round(sum(engine.times.moved_bytes) / (crossed * whole), 4)
                    profile = host_profile(engine, args.profile_steps) if rate > 0 and args.profile_steps else None
                    kernels = worker_kernels(engine, args.worker_kernel_steps) \
                        if policy == "louiskv" and args.worker_kernel_steps and self.device.type == "cuda" else None  # fmt: skip
                    mean = statistics.fmean(samples)
                    rows.append({
                        "part": part, "policy": policy, "context": context, "batch": batch, "rate": rate,
                        "median_ms": round(statistics.median(samples), 3), "p90_ms": round(_percentile(samples, 0.9), 3),
                        "mean_ms": round(mean, 3), "tokens_per_s": round(batch * 1e3 / mean, 1),
                        "boundary_share": round(crossed / len(samples) / batch, 4), "graphed": engine.graph.graphed, "overlap": engine.overlap,
                        "switch": engine.switch,
                        **({"worker_selection": True, "worker_selections": engine.on_crossings.selections}
                           if engine.on_crossings is not None else {}),
                        **({"worker_choices": engine.worker_choices - choices_before}
                           if engine.worker_choices > choices_before else {}),
                        **({"mean_ms_blocks": [round(m, 3) for m in blocks], "block_spread": round(max(blocks) / min(blocks), 3)}
                           if len(blocks) > 1 else {}),
                        "capacity": capacity, "budget": config.get("budget"), "lag": lag, "query_drift": args.query_drift,
                        "shared_prompt": shared,
                        "switch_interval_ms": round(switch * 1e3, 3),
                        "ingest_s_first": round(ingest[0], 3), "ingest_s_mean": round(statistics.fmean(ingest), 3),
                        "setup_s": round(setup_s, 2), "worker_peak_gib": self.worker_peak(),
                        "daemon_gpu_gib": _gib(daemon_device), "host_gib": _gib(host_bytes),
                        "gpu_kv_gib_full_equivalent": _gib(batch * context * self.token_bytes),
                        **waits, **pauses.summary(), **({"host_profile": profile} if profile else {}),
                        **({"worker_kernels": kernels} if kernels else {}),
                    })  # fmt: skip
            # The captured step alone (no daemon calls, CUDA events): what the host side adds.
            graph_only = time_fn(engine.graph, self.device, warmup=2, reps=max(8, args.steps // 2))
            for row in rows:
                row["graph_only_ms"] = round(graph_only.median_ms, 3)
            return rows
        finally:
            if engine is not None:
                engine.close()
            for session in opened:
                session.close()
            self.free()

    # ---- parts -----------------------------------------------------------------------------------
    def guarded(self, what: str, fn) -> None:
        try:
            fn()
        except Exception as exc:  # a failed configuration is recorded; the next one still runs
            message = f"{what}: {type(exc).__name__}: {exc}"[:800]
            traceback.print_exc()
            log("  ERROR " + message)
            self.errors.append(message)
            self.write()
            self.free()

    def run(self) -> int:
        args = self.args
        parts = [p for p in args.parts.split(",") if p]
        contexts, batches = _ints(args.contexts), _ints(args.batches)
        policies = [p for p in args.policies.split(",") if p]
        rates = [float(r) for r in args.rates.split(",") if r]
        need = max(
            [self.host_tokens(c, b) for c in contexts for b in batches if "step" in parts]
            + [args.many * args.many_context if "many" in parts else 0]
            + [int(args.host_cap_gib * GiB / self.token_bytes) if "capped" in parts else 0]
        )  # fmt: skip
        host_gib = args.host_pool_gib or max(1.0, need * self.token_bytes * 1.1 / GiB + 1)
        self.meta["host_pool_gib"] = host_gib
        self.meta["skipped"] = []
        device_gib = 24.0 if self.device.type == "cuda" else 1.0
        log(f"e2e: {self.meta.get('device')} shape={self.shape} host pool {host_gib:.1f} GiB")
        self.meta["host_probe"] = {"start": host_probe()}  # (a slow host episode shows beside the figures)
        started = time.perf_counter()
        # Pinning a large host tier takes a while (minutes for ~100 GiB on a fresh VM).
        extra_env = dict(item.split("=", 1) for item in args.daemon_env)
        daemon_class = EmbeddedDaemon if args.daemon == "embedded" else LocalDaemon
        daemon = daemon_class(host_pool_gb=host_gib, device_pool_gb=device_gib, device=str(self.device),
                              env=extra_env or None, log_path=args.daemon_log or None)  # fmt: skip
        with daemon.start(timeout=600.0):
            self.meta["daemon_start_s"] = round(time.perf_counter() - started, 1)
            if args.worker_cpus:  # after the daemon's start: a daemon process (or thread) keeps its own CPUs
                os.sched_setaffinity(0, cpu_set(args.worker_cpus))
            self.meta["worker_cpus"] = args.worker_cpus
            with KVRecallClient(daemon.target, "bench-e2e", timeout=600.0) as client:
                if "step" in parts:
                    for context in contexts:
                        for batch in batches:
                            if self.host_tokens(context, batch) * self.token_bytes > host_gib * GiB * 0.97:
                                self.meta["skipped"].append(f"{context}x{batch}: host tier of {host_gib} GiB too small")
                                continue
                            log(f"step: context {context}, batch {batch}")
                            self.guarded(f"full {context}x{batch}", lambda c=context, b=batch: self.add(self.full("step", c, b)))
                            for policy in policies:
                                self.guarded(
                                    f"{policy} {context}x{batch}",
                                    lambda p=policy, c=context, b=batch: [
                                        self.add(r) for r in self.sessions(client, "step", p, c, b, rates)
                                    ],
                                )  # fmt: skip
                if "capped" in parts:
                    self.guarded("capped", lambda: self.capped(client))
                if "many" in parts:
                    log(f"many: {args.many} sequences at {args.many_context}")
                    self.guarded("many", lambda: [
                        self.add(r) for r in self.sessions(client, "many", "louiskv", args.many_context, args.many,
                                                           [0.0, MEASURED_RATE])
                    ])  # fmt: skip
        self.meta["wall_s"] = round(time.perf_counter() - started, 1)
        self.meta["host_probe"]["end"] = host_probe()
        self.summarise()
        self.write()
        print(format_table(self.rows))
        for line in self.summary_lines:
            print(line)
        self.plot()
        return 0 if not self.errors else 1

    def capped(self, client: KVRecallClient) -> None:
        """Sustained tokens/s with the GPU's KV capped: full fits cap / per-sequence KV sequences,
        kvrecall as many as its working sets (and the host tier) allow."""
        args, context = self.args, self.args.capped_context
        cap = args.gpu_kv_cap_gib * GiB
        full_batch = max(1, int(cap // (context * self.token_bytes)))
        log(f"capped: {args.gpu_kv_cap_gib} GiB GPU KV at {context}: full {full_batch} sequences")
        self.add(self.full("capped", context, full_batch))
        probe = client.open_session(self.spec(context), "louiskv", {"budget": args.budget}, device=self.device,
                                    deferred_eviction=args.notices != "waited")
        ws_bytes = probe.stats().device_bytes
        probe.close()
        host_limit = int(args.host_cap_gib * GiB // (context * self.token_bytes))
        batch = max(1, min(int(cap // max(ws_bytes, 1)), host_limit, 64))
        log(f"capped: kvrecall {batch} sequences (working set {ws_bytes / 2**20:.0f} MiB each)")
        for row in self.sessions(client, "capped", "louiskv", context, batch, [MEASURED_RATE]):
            row["limited_by"] = "host tier" if batch == host_limit else "GPU cap"
            self.add(row)

    # ---- summary ---------------------------------------------------------------------------------
    def summarise(self) -> None:
        lines = []
        ratios: dict[str, float] = {}

        def find(part, policy, context, batch, rate=None):
            for r in self.rows:
                if (r["part"], r["policy"], r["context"], r["batch"]) == (part, policy, context, batch) and (
                    rate is None or r["rate"] == rate
                ):
                    return r
            return None

        for r in self.rows:
            if r["part"] != "step" or r["policy"] != "louiskv" or r["rate"] != MEASURED_RATE:
                continue
            c, b = r["context"], r["batch"]
            full = find("step", "full", c, b)
            bound = find("step", "louiskv", c, b, 0.0)
            key = f"{c // 1024}K_b{b}_lag{r['lag']}" + (
                f"_switch{r['switch_interval_ms']}ms" if r.get("switch_interval_ms") not in (None, self.switch_interval * 1e3) else ""
            )
            if full:
                ratios[f"speedup_vs_full_{key}"] = round(full["median_ms"] / r["mean_ms"], 3)
            if bound:
                ratios[f"over_bound_{key}"] = round(r["mean_ms"] / bound["mean_ms"], 3)
                ratios[f"over_graph_only_{key}"] = round(r["mean_ms"] / r["graph_only_ms"], 3)
        full_c = [r for r in self.rows if r["part"] == "capped" and r["policy"] == "full"]
        kv_c = [r for r in self.rows if r["part"] == "capped" and r["policy"] == "louiskv"]
        if full_c and kv_c:
            ratios["capped_tokens_per_s_vs_full"] = round(kv_c[0]["tokens_per_s"] / full_c[0]["tokens_per_s"], 3)
        many = {r["rate"]: r for r in self.rows if r["part"] == "many"}
        if 0.0 in many and MEASURED_RATE in many:
            ratios["many_step_at_measured_rate_over_rate0"] = round(
                many[MEASURED_RATE]["mean_ms"] / many[0.0]["mean_ms"], 3
            )
        if MEASURED_RATE in many:  # did the steps of the many sequences wait on the daemon?
            for key in ("wait_ms_mean", "late_ms_mean", "late_steps", "answer_ms_median", "answer_ms_p90", "answer_ms_max"):
                if many[MEASURED_RATE].get(key) is not None:
                    ratios[f"many_{key}_at_measured_rate"] = many[MEASURED_RATE][key]
        self.meta["ratios"] = ratios
        for key, value in ratios.items():
            lines.append(f"{key}: {value}")
        probe = self.meta.get("host_probe", {})
        if "start" in probe and "end" in probe:
            lines.append("host probe (gather / python ms), start and end: "
                         f"{probe['start']['gather_ms']} / {probe['start']['python_ms']}, "
                         f"{probe['end']['gather_ms']} / {probe['end']['python_ms']}")
        self.summary_lines = lines

    def plot(self) -> None:
        path = self.args.plot or os.path.splitext(self.args.out)[0] + ".png"
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        series: dict[str, list[tuple[int, float]]] = {}
        for r in self.rows:
            if r["part"] != "step":
                continue
            label = f"{r['policy']} b{r['batch']}" + ("" if r["rate"] is None else f" r={r['rate']:g}")
            series.setdefault(label, []).append((r["context"], r["mean_ms"]))
        if not series:  # a bench of the many / capped parts alone: no step against context to draw
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step (ms, mean)")
        ax.set_title(f"kvrecall bench e2e: {self.meta.get('device')}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


NOTES = [
    "kvrecall rows: host wall clock per Engine.step() (graph replay + the step's only sync + the daemon "
    "calls it needed: AppendNotices every 16 tokens, boundary retrievals), mean over the timed steps; "
    "tokens_per_s = batch / mean step. With overlap (meta.overlap; --overlap auto turns it on where the "
    "engine can) each step() launches the next step before the host work of the one it returns.",
    "query_drift (meta and rows): 1 = every forced crossing retrieves for this step's query (random weights: "
    "a fresh set each time); below 1 an emulation of a real model's overlapping retrievals (0.15 moved 0.21 "
    "of a budget per retrieval on an H200 against the bundled SmolLM2's 0.20); moved_share reports it.",
    "full rows: the same engine's step with full KV on the GPU (SDPA enable_gqa over the live length), "
    "graph replay timed with CUDA events (median). kv_layers_shared: fewer KV buffers than layers "
    "because all would not fit; every layer still reads a full-size buffer.",
    f"Random weights drift on every step: louiskv's boundaries follow a schedule at `rate` "
    f"({MEASURED_RATE} is the rate measured on the real model; meta.schedule 'even': one boundary "
    f"per 1/rate steps per slot from a random phase); the device flag is still computed.",
    "quest retrieves after every step (rate 1). graph_only_ms: the captured step without daemon calls.",
    "shared_prompt (--shared-prompt, step part): the batch's sequences decode over one prompt document the "
    "daemon holds once (the first session's ingest registered it as a prefix; the others opened over it): "
    "the same decode work per sequence, one host copy of the prompt.",
    "gc_collections: the cyclic collector's passes per generation during a row's timed steps (any thread of "
    "this process: with --daemon embedded the daemon's too), gc_pause_ms_max the longest, gc_full_ms_total "
    "the full passes' time; meta.gc_freeze: setup's objects frozen first (kvrecall/gcfreeze.py).",
    "lag: steps a slot that crossed a boundary reads a shadow copy of its working set while the daemon "
    "retrieves into the real one (engine/engine.py); 0 = the retrieval blocks the next step.",
    "Daemon waits (host clock): wait_ms_* per step is what the step waited on the daemon (the step's "
    "AppendNotices, one Boundaries call, plus late retrievals); late_ms_* / late_steps the part spent on "
    "retrievals still unanswered when their slots switched back (0: the daemon kept up); answer_ms_* is each "
    "step's retrieving Boundaries call, sent to answered (answers: how many).",
    "The prompt's KV is random and ingested as it is (this bench times decode; prefill memory and time "
    "are `python -m kvrecall.bench.prefill`).",
]


def daemon_waits(times: DaemonTimes) -> dict[str, Any]:
    """Whether the steps waited on the daemon: per step, the wait (notices, late retrievals)
    and its late-retrieval part (mean, p90, max, steps that waited for one); per retrieving
    Boundaries call, its answer latency (median, p90, max); where a step's time went (means:
    launch to sync, the captured step's GPU time, host work not waiting on the daemon)."""
    row: dict[str, Any] = {"answers": len(times.answer_s), "late_steps": sum(1 for s in times.late_s if s > 0)}
    for name, samples in (("wait", times.wait_s), ("late", times.late_s)):
        ms = [s * 1e3 for s in samples] or [0.0]
        row |= {f"{name}_ms_mean": round(statistics.fmean(ms), 3), f"{name}_ms_p90": round(_percentile(ms, 0.9), 3),
                f"{name}_ms_max": round(max(ms), 3)}  # fmt: skip
    for name, samples in (("sync", times.sync_s), ("graph_gpu", times.graph_gpu_s), ("host", times.host_s),
                          ("shadow", times.shadow_s), ("send", times.send_s), ("notice_daemon", times.daemon_s),
                          ("notice_call", times.call_s), ("notice_queued", times.queued_s),
                          ("notice_serve", times.serve_s), ("notice_sync", times.gpu_sync_s),
                          ("retrieval_queued", times.retrieval_queued_s), ("retrieval_serve", times.retrieval_serve_s),
                          ("retrieval_sync", times.retrieval_sync_s)):  # fmt: skip
        if samples:
            row[f"{name}_ms_mean"] = round(statistics.fmean(samples) * 1e3, 3)
    if times.notice_s:  # deferred notices: sent to answered (the step did not wait for them)
        row["notice_answer_ms_mean"] = round(statistics.fmean(times.notice_s) * 1e3, 3)
    if times.shadow_steps:  # steps a crossed slot read its shadow (the lag with switch="fixed")
        row["shadow_steps_mean"] = round(statistics.fmean(times.shadow_steps), 3)
    if times.moved_bytes:
        row["moved_mib_mean"] = round(statistics.fmean(times.moved_bytes) / 2**20, 2)
    if any(times.staged_rows):  # rows the worker copied itself (worker_copy_share), per retrieving call
        row["staged_rows_mean"] = round(statistics.fmean(times.staged_rows), 1)
    answers = [s * 1e3 for s in times.answer_s]
    for key, value in (("median", statistics.median), ("p90", lambda a: _percentile(a, 0.9)), ("max", max)):
        row[f"answer_ms_{key}"] = round(value(answers), 3) if answers else None
    return row


def _overlap(args: argparse.Namespace) -> bool:
    """--overlap as the engines run it: auto is on where Engine(overlap=True) can run."""
    if args.overlap != "auto":
        return args.overlap == "on"
    return args.notices != "waited" and min(_ints(args.lag)) >= 1 and args.host_copies == "copy"


def _drift(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def drift_query(query: torch.Tensor, last: dict[str, torch.Tensor], key: str, drift: float) -> None:
    """--query-drift: the retrieval query of a forced crossing, written over the slot's working-set
    query [L, Hq, D] (which the daemon scores with) before the engine sends it: the slot's last
    retrieval query moved `drift` of the way to this step's, each (layer, head) at this step's
    norm (a query's scale changes no ranking, but a vote can weigh heads by it). The first
    crossing of a slot keeps its query. An emulation knob: with random weights every step's
    query is unrelated to the last, so every retrieval would choose a fresh set."""
    now = query.float()
    previous = last.get(key)
    if previous is None:
        last[key] = now.clone()
        return
    previous.lerp_(now, drift)
    previous.mul_(now.norm(dim=-1, keepdim=True) / previous.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    query.copy_(previous)


def host_profile(engine: Engine, steps: int, top: int = 25) -> list[dict[str, Any]]:
    """`steps` engine steps under cProfile: the `top` functions by own time (seconds per step,
    calls per step), so a step's host work can be located on the machine that ran it."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own, cumulative, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {"function": f"{os.path.basename(file)}:{line}:{name}", "own_ms_per_step": round(own * 1e3 / steps, 3),
         "cum_ms_per_step": round(cumulative * 1e3 / steps, 3), "calls_per_step": round(calls / steps, 2)}
        for (file, line, name), (_, calls, own, cumulative, _) in rows
    ]  # fmt: skip


def worker_kernels(engine: Engine, steps: int, top: int = 20) -> dict[str, Any]:
    """`steps` engine steps under torch.profiler (CUDA activity: this process's kernels and
    copies, those inside the captured graph included): per kernel name its launches and GPU
    milliseconds per step, the `top` by time, the copies apart, and the gaps between the kernels
    (`gaps`: server.profiling.kernel_gaps, a captured step's launch gaps by kernel pair). Two
    processes' kernels time-slice, so a kernel's recorded time includes a slice it waited out
    while the daemon ran: comparing rates shows which of the step's kernels a boundary lengthens."""
    from torch.profiler import ProfilerActivity, profile

    from kvrecall.server.profiling import cuda_events, kernel_gaps, kernel_timeline

    torch.cuda.synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize(engine.device)
    events = prof.events()
    _, kernels, copies = cuda_events(events)

    def table(groups: dict[str, list[float]], n: int) -> list[dict[str, Any]]:
        rows = [{"name": name[:100], "launches_per_step": round(len(t) / steps, 2),
                 "ms_per_step": round(sum(t) / 1e3 / steps, 4)} for name, t in groups.items()]  # fmt: skip
        return sorted(rows, key=lambda r: -r["ms_per_step"])[:n]

    total = sum(sum(t) for t in kernels.values()) / 1e3 / steps
    return {"steps": steps, "kernel_ms_per_step": round(total, 3), "kernels": table(kernels, top),
            "copies": table(copies, 8), "gaps": kernel_gaps(kernel_timeline(events), steps)}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'part':7} {'policy':8} {'ctx':>7} {'B':>3} {'rate':>6} {'median':>8} {'p90':>8} {'mean':>8} {'tok/s':>9} "
            f"{'GPU GiB w/d':>12} {'wait':>7} {'late':>5} {'ans p50/p90':>13}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        rate = "" if r["rate"] is None else f"{r['rate']:.3g}"
        mem = f"{r.get('worker_peak_gib') or 0:.1f}/{r.get('daemon_gpu_gib') or 0:.1f}"
        wait = "" if "wait_ms_mean" not in r else f"{r['wait_ms_mean']:.2f}"
        late = "" if "late_steps" not in r else str(r["late_steps"])
        answer = "" if r.get("answer_ms_median") is None else f"{r['answer_ms_median']:.1f}/{r['answer_ms_p90']:.1f}"
        lines.append(
            f"{r['part']:7} {r['policy']:8} {r['context']:>7} {r['batch']:>3} {rate:>6} {r['median_ms']:>8.2f} "
            f"{r['p90_ms']:>8.2f} {r['mean_ms']:>8.2f} {r['tokens_per_s']:>9.1f} {mem:>12} {wait:>7} {late:>5} {answer:>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1 and --warmup >= 0")
    if args.worker_cpus:
        try:
            cpu_set(args.worker_cpus)
        except ValueError as exc:
            raise SystemExit(f"--worker-cpus: {exc}") from None
    return Bench(args, argv).run()


if __name__ == "__main__":
    sys.exit(main())
