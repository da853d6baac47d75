"""`kvrecall` command line: serve | health | stats | demo | eval | soak | worker (`worker --serve`:
the OpenAI-compatible server) | bench."""

from __future__ import annotations

import argparse
import os
import sys

from kvrecall import __version__, stats_view
from kvrecall.v1 import kvrecall_pb2 as pb

# The policies a session can name: PolicyConfig's config fields (tests/test_cli.py checks that
# they are the daemon's registry, kvrecall.server.policies, which imports torch).
POLICY_CHOICES = tuple(field.name for field in pb.PolicyConfig.DESCRIPTOR.oneofs_by_name["config"].fields)


def _serve(args: argparse.Namespace) -> int:
    from kvrecall.server.config import ConfigError, load_config
    from kvrecall.server.daemon import serve

    overrides = {
        "listen": args.listen,
        "device": args.device,
        "host_pool_gb": args.host_pool_gb,
        "device_pool_gb": args.device_pool_gb,
        "page_kb": args.page_kb,
        "lease_seconds": args.lease_seconds,
        "metrics_port": args.metrics_port,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "tokens_file": args.tokens_file,
        "worker_quota_gb": args.worker_quota_gb,
        "worker_share": args.worker_share,
        "log_level": args.log_level,
        "session_ops": args.session_ops,
        "host_reads": args.host_reads,
        "warmup": args.warmup,
        "parent_pid": args.parent_pid,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"kvrecall serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0


def _http_health(url: str, timeout: float) -> int:
    """A serving worker's readiness: 200 from its /health (which asks its daemon)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            print(response.read().decode(errors="replace"))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"NOT_READY (HTTP {exc.code}: {exc.read().decode(errors='replace')})")
    except (urllib.error.URLError, OSError) as exc:
        print(f"NOT_READY ({exc})")
    return 1


def _health(args: argparse.Namespace) -> int:
    if args.http:
        return _http_health(args.http, args.timeout)
    # grpc only (no torch import): container health probes stay cheap.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel, metadata = stats_view.connect(args)
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=args.timeout, metadata=metadata
        )
    except grpc.RpcError as exc:
        print(f"NOT_SERVING ({exc.code().name}: {exc.details()})")
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _demo(args: argparse.Namespace) -> int:
    from kvrecall.demo import run_demo

    return run_demo(args)


def _worker(args: argparse.Namespace) -> int:
    from kvrecall.serve.server import worker_id

    args.worker_id = worker_id(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of a tensor-parallel group (docs/MULTIGPU.md)
        if args.target == EMBEDDED:
            raise SystemExit("--target embedded: not for a tensor-parallel group (its ranks share one daemon)")
        from kvrecall.tp.worker import run_tp_worker

        return run_tp_worker(args)
    embedded = None
    if args.target == EMBEDDED:  # the daemon on a thread of this process (kvrecall.server.embedded)
        from kvrecall.server.embedded import EmbeddedDaemon

        device = args.device or os.environ.get("KVRECALL_DEVICE", "cpu")  # (the worker's: run_server, run_worker)
        embedded = EmbeddedDaemon(device=device).start(timeout=600.0)
        args.target, args.embedded = embedded.target, True
    try:
        if args.serve:
            from kvrecall.serve.server import run_server

            return run_server(args)
        from kvrecall.demo import run_worker

        return run_worker(args)
    finally:
        if embedded is not None:
            embedded.stop()


def _eval(args: argparse.Namespace) -> int:
    from kvrecall.eval.harness import run_eval

    return run_eval(args)


def _soak(args: argparse.Namespace) -> int:
    from kvrecall.soak import main as run_soak

    return run_soak(args)


EMBEDDED = "embedded"  # worker --target: the daemon on a thread of the worker's process
MAX_LAG = 15  # below every policy's spill_every (16): Engine refuses a lag a session cannot take
SWITCHES = ("fixed", "answered", "patient", "adaptive")  # Engine's `switch` (kvrecall/engine/engine.py; torch-free here)


def _between(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _at_least(minimum: int):
    """An argparse type: an integer >= `minimum`."""
    return _between(minimum)


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy", default="louiskv", choices=POLICY_CHOICES, help="the session's KV policy (default louiskv)"
    )
    parser.add_argument("--budget", type=int, help="retrieved-token budget (policies that take one)")
    parser.add_argument(
        "--policy-config", metavar="JSON",
        help="more fields of the policy's config as a JSON object, e.g. '{\"min_gap\": 0}' (docs/TUNING.md)",
    )


BENCHES = {
    "e2e": ("kvrecall.bench.e2e", "decode through the worker engine and the daemon vs the best full-KV step"),
    "kernels": ("kvrecall.bench.cli", "kernel ceilings, gather, clustering and the emulated decode step"),
    "daemon": ("kvrecall.bench.daemon_rt", "append / boundary round trips through a daemon"),
    "prefixes": ("kvrecall.bench.prefixes", "N sessions over one shared document: host bytes and ingest time"),
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHES[args.which][0])
    return int(module.main(args.bench_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrecall", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvrecall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "--listen", help="comma-separated unix:///path or HOST:PORT (default unix:///tmp/kvrecall.sock)"
    )
    serve.add_argument("--device", help="cpu | cuda | cuda:N (default cpu)")
    serve.add_argument("--host-pool-gb", type=float, help="host tier size in GiB (default 4)")
    serve.add_argument("--device-pool-gb", type=float, help="working-set pool size in GiB (default 2)")
    serve.add_argument("--page-kb", type=int, help="host page size in KiB (default 2048)")
    serve.add_argument("--lease-seconds", type=float, help="default session lease (default 30)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    serve.add_argument("--tls-cert", help="PEM certificate for TCP listeners")
    serve.add_argument("--tls-key", help="PEM private key for TCP listeners")
    serve.add_argument("--tls-client-ca", help="PEM CA: require client certificates (mutual TLS)")
    serve.add_argument("--tokens-file", help="file of 'worker_id token' lines: bearer-token auth")
    serve.add_argument("--worker-quota-gb", type=float, help="pool GiB one worker may hold (0 = unlimited)")
    serve.add_argument(
        "--worker-share", type=float, help="fraction of each pool one worker may hold (default 0.5; 1 = no limit)"
    )
    serve.add_argument("--log-level", help="DEBUG | INFO | WARNING | ERROR")
    serve.add_argument(
        "--session-ops", choices=("thread", "inline"),
        help="run appends and boundaries in a worker thread (default) or on the event loop (no thread hop)",
    )  # fmt: skip
    serve.add_argument(
        "--host-reads", choices=("auto", "copy", "kernel"),
        help="how a background retrieval's rows (one the worker does not wait for) leave the pinned host tier on "
        "a GPU: the host gathers them and the copy engine moves them (copy; the GPU's SMs stay free for "
        "workers), the placement kernel reads them over PCIe itself (kernel), or copy for a call that can move "
        "at most 768 MiB and the kernel above (auto, the default: the host's gather falls behind at tens of "
        "sessions per call); other placements always take the kernel",
    )  # fmt: skip
    serve.add_argument(
        "--warmup", help="dtype:head_dim pairs whose kernels compile at start on CUDA, e.g. bfloat16:128 ('' = none)"
    )
    serve.add_argument(
        "--parent-pid", type=int,
        help="stop (as on SIGTERM) once this process, the daemon's parent, is gone (a tool's private daemon; 0 = off)",
    )  # fmt: skip
    serve.add_argument(
        "--config", help="JSON or TOML file of the same settings (flags and KVRECALL_* env win)"
    )
    serve.set_defaults(func=_serve)

    health = sub.add_parser("health", help="check a daemon with the standard gRPC health service")
    stats_view.add_connection_arguments(health)
    health.add_argument("--http", help="check a serving worker instead: URL of its /health")
    health.set_defaults(func=_health)

    stats = sub.add_parser("stats", help="what a running daemon holds: pools, sessions, workers")
    stats_view.add_arguments(stats)
    stats.set_defaults(func=stats_view.run)

    demo = sub.add_parser("demo", help="run the bundled test model through the daemon on a long prompt")
    demo.add_argument("--target", help="daemon address (default: start a local daemon)")
    add_policy_arguments(demo)
    demo.add_argument("--context-tokens", type=int, default=2000, help="prompt length in tokens (default 2000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated prompt and its code (default 0)")
    demo.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default 24)")
    demo.add_argument(
        "--questions", type=int, default=0,
        help="ask N questions about one document through N sessions sharing it (a shared prefix)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    demo.set_defaults(func=_demo)

    worker = sub.add_parser(
        "worker",
        help="a model worker: with --serve an OpenAI-compatible HTTP server; without, run decode "
        "sessions of the bundled model, then exit",
    )
    worker.add_argument(
        "--target", required=True,
        help="daemon address, or `embedded`: a daemon on a thread of this process (its KVRECALL_* settings from "
        "the environment; its kernels share the worker's CUDA context instead of time-slicing with it; for one "
        "worker on a GPU, docs/TUNING.md)",
    )
    add_policy_arguments(worker)
    worker.add_argument(
        "--worker-id", help="identity on the daemon (quotas, stats; default: $KVRECALL_WORKER_ID or the host name)"
    )
    worker.add_argument("--sessions", type=int, default=1, help="sessions to run one after another")
    worker.add_argument("--context-tokens", type=int, default=2048, help="prompt length in tokens (default 2048)")
    worker.add_argument(
        "--max-new-tokens", type=int, default=16, help="tokens per session (--serve: chat requests without max_tokens)"
    )
    worker.add_argument("--device", default=None, help="cpu | cuda[:N] (default: $KVRECALL_DEVICE or cpu)")
    worker.add_argument("--token", help="bearer token (remote daemons with --tokens-file)")
    worker.add_argument("--serve", action="store_true", help="serve OpenAI-compatible HTTP requests until stopped")
    worker.add_argument("--host", default="0.0.0.0", help="--serve: address to listen on")
    worker.add_argument("--port", type=int, default=8000, help="--serve: HTTP port")
    worker.add_argument(
        "--model", help="--serve: a transformers model directory (default: the bundled SmolLM2-135M-Instruct)"
    )
    worker.add_argument(
        "--max-model-len", type=int, help="--serve: prompt + completion tokens per request (default: the model's window)"
    )
    worker.add_argument(
        "--max-batch", type=_at_least(1), default=8, help="--serve: requests that share a decode step (default 8)"
    )
    worker.add_argument(
        "--max-queue", type=_at_least(0), default=64,
        help="--serve: requests that may wait for a slot; past it, HTTP 503 (default 64)",
    )
    worker.add_argument(
        "--lag", type=_between(0, MAX_LAG), default=None,
        help=f"--serve: decode steps a request that crossed a boundary reads its old working set while the daemon "
        f"retrieves (0-{MAX_LAG}; default 4; longer: slower answers are waited for less, at some fidelity, "
        "docs/TUNING.md)",
    )
    worker.add_argument(
        "--overlap", choices=("on", "off"), default="on",
        help="--serve: launch each decode step before the host work of the one before (boundary flags, daemon "
        "calls), so that work runs while the GPU decodes (default on; needs --lag >= 1, off at lag 0)",
    )
    worker.add_argument(
        "--switch", choices=SWITCHES, default="fixed",
        help="--serve: when a request that crossed a boundary leaves its old working set: fixed (after exactly "
        "--lag steps, waiting for a late answer; deterministic), answered (as soon as answered, --lag at the "
        "latest), patient (after --lag steps once answered, 2 x --lag at the latest: a late answer rarely stalls "
        "the batch), adaptive (after exactly as many steps as the daemon's recent answers needed, --lag to "
        "2 x --lag); default fixed (docs/TUNING.md)",
    )
    worker.add_argument(
        "--gc-freeze", choices=("on", "off"), default="on",
        help="--serve: once the engine is ready, freeze the interpreter's objects (kvrecall/gcfreeze.py), so a full "
        "garbage collection, which stops every thread of the process, walks only what came after (default on)",
    )
    worker.set_defaults(func=_worker)
    eval_ = sub.add_parser("eval", help="accuracy + fidelity of every policy x budget against full KV")
    from kvrecall.eval.harness import add_arguments as eval_arguments

    eval_arguments(eval_)
    eval_.set_defaults(func=_eval)
    soak = sub.add_parser("soak", help="N concurrent sessions x M decode steps; RSS and pool bytes over time")
    from kvrecall.soak import add_arguments as soak_arguments

    soak_arguments(soak)
    soak.set_defaults(func=_soak)
    bench = sub.add_parser(
        "bench", help="GPU benchmarks: " + "; ".join(f"{k}: {v[1]}" for k, v in BENCHES.items()),
        description="Each benchmark prints a table and writes JSON; `kvrecall bench WHICH --help` for its flags.",
    )  # fmt: skip
    bench.add_argument("which", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
