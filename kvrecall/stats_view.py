"""`kvrecall stats`: what a running daemon holds, for an operator (pools, sessions, workers, shared prefixes).

One GetStats call, rendered as tables by rich (or `--json`: the StatsResponse as JSON, field names as
in the proto). gRPC only, no torch import, so it is as cheap to run as `kvrecall health`.
"""

from __future__ import annotations

import argparse
import json

GIB = 1 << 30


def _bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def _table(title: str | None, header: list[str], rows: list[list[str]]):
    from rich import box
    from rich.table import Table

    table = Table(*header, title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in table.columns:
        column.no_wrap = True
    for row in rows:
        table.add_row(*row)
    return table


def render(response) -> str:
    """A StatsResponse as the tables an operator reads (rows are never cut: ids stay whole)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=1000, color_system=None, highlight=False)
    console.print(f"kvrecall {response.version} on {response.device}")
    console.print(_table(
        None,
        ["pool", "kind", "capacity", "used", "free", "used %"],
        [
            [
                p.tier, p.kind, _bytes(p.capacity_bytes), _bytes(p.used_bytes), _bytes(p.free_bytes),
                f"{100 * p.used_bytes / p.capacity_bytes:.1f}" if p.capacity_bytes else "-",
            ]
            for p in response.pools
        ],
    ))  # fmt: skip
    console.print(f"sessions: {len(response.sessions)}")
    if response.sessions:
        console.print(_table(
            None,
            ["session", "worker", "policy", "tag", "tp", "prompt", "tokens", "resident (max)", "boundaries",
             "appends", "host->gpu", "host", "gpu", "of it metadata"],
            [
                [
                    s.session_id, s.worker_id, s.policy, s.tag or "-",
                    f"{s.tp_rank}/{s.tp_size}" if s.tp_size else "-",
                    str(s.prompt_tokens), str(s.tokens), f"{s.resident_tokens} ({s.max_resident_tokens})",
                    str(s.boundaries), str(s.appends), _bytes(s.bytes_host_to_device), _bytes(s.host_bytes),
                    _bytes(s.device_bytes), _bytes(s.metadata_bytes),
                ]
                for s in response.sessions
            ],
        ))  # fmt: skip
    if response.workers:
        console.print(_table(
            "workers:",
            ["worker", "sessions", "host", "gpu"],
            [
                [w.worker_id, str(w.sessions), _bytes(w.host_bytes), _bytes(w.device_bytes)]
                for w in response.workers
            ],
        ))  # fmt: skip
    if response.prefixes or response.prefix_evictions:
        console.print(_table(
            f"shared prefixes: {len(response.prefixes)} held, {response.prefix_evictions} evicted since start",
            ["prefix", "worker", "policy", "tokens", "host", "gpu", "sessions", "hits", "idle"],
            [
                [
                    p.prefix_id[:16], p.worker_id, p.policy, str(p.tokens), _bytes(p.host_bytes), _bytes(p.device_bytes),
                    str(p.refs), str(p.hits), f"{p.idle_seconds:.0f}s" if not p.refs else "-",
                ]
                for p in response.prefixes
            ],
        ))  # fmt: skip
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip().splitlines())


def connect(args: argparse.Namespace):
    """The channel and call metadata for `--target` / `--tls-ca` / `--token` (see
    add_connection_arguments); `kvrecall health` uses it too. The caller closes the channel."""
    import grpc

    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.target)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
    return channel, metadata


def run(args: argparse.Namespace) -> int:
    """Entry point of `kvrecall stats`: 0 on an answer, 1 when the daemon cannot be asked."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from kvrecall.v1 import kvrecall_pb2 as pb
    from kvrecall.v1 import kvrecall_pb2_grpc as pb_grpc

    channel, metadata = connect(args)
    try:
        # Daemon-wide (session-scoped stats need the session's capability); --session filters.
        response = pb_grpc.KVRecallStub(channel).GetStats(pb.StatsRequest(), timeout=args.timeout, metadata=metadata)
    except grpc.RpcError as exc:
        print(f"kvrecall stats: {args.target}: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()
    if args.session:
        kept = [s for s in response.sessions if s.session_id == args.session]
        if not kept:
            print(f"kvrecall stats: {args.target}: NOT_FOUND: session_id: no open session {args.session!r} this caller may see")
            return 1
        del response.sessions[:]
        response.sessions.extend(kept)
    if args.json:
        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=1))
    else:
        print(render(response))
    return 0


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--target, --token, --tls-ca and --timeout of the commands that ask a running daemon."""
    parser.add_argument(
        "--target", default="unix:///tmp/kvrecall.sock", help="daemon address (default unix:///tmp/kvrecall.sock)"
    )
    parser.add_argument("--token", help="bearer token, where the daemon has auth on")
    parser.add_argument("--tls-ca", help="CA certificate of a TLS daemon")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--session", help="one session id (default: every session)")
    parser.add_argument("--json", action="store_true", help="the StatsResponse as JSON")
