"""The gRPC floor of one Decode-like round trip on this machine.

A bare grpc.aio server (another process, uvloop when installed, as the daemon) echoes 64 bytes
over a unix socket: through a bidi stream fed from a queue (the sync client's Decode pattern)
and through a unary call, with (`thread`) or without (`plain`) an `asyncio.to_thread` hop per
message (the daemon's hop into its session work). Prints the p50 of 2000 round trips each.

Usage: python scripts/grpc_echo_floor.py plain|thread
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc


async def _serve(socket: str, hop: bool, ready) -> None:
    async def bidi(requests, context):
        async for request in requests:
            if hop:
                await asyncio.to_thread(lambda: None)
            yield request

    async def unary(request, context):
        if hop:
            await asyncio.to_thread(lambda: None)
        return request

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(socket)
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _server_process(socket: str, hop: bool, ready) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(socket, hop, ready))


def p50_us(call, n: int = 2000, warm: int = 200) -> float:
    for _ in range(warm):
        call()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "plain"
    if mode not in ("plain", "thread"):
        raise SystemExit("usage: python scripts/grpc_echo_floor.py plain|thread")
    socket = "unix://" + os.path.join(tempfile.mkdtemp(), "echo.sock")
    ready = mp.Event()
    server = mp.Process(target=_server_process, args=(socket, mode == "thread", ready), daemon=True)
    server.start()
    ready.wait(30)
    channel = grpc.insecure_channel(socket)
    inbox: queue.Queue = queue.Queue()

    def requests() -> Iterator[bytes]:
        while True:
            yield inbox.get()

    replies = channel.stream_stream("/echo.Echo/Bidi")(requests())
    unary = channel.unary_unary("/echo.Echo/Unary")
    message = b"x" * 64

    def stream_round_trip() -> None:
        inbox.put(message)
        next(replies)

    print(f"{mode} stream p50 {p50_us(stream_round_trip):.0f} us")
    print(f"{mode} unary p50 {p50_us(lambda: unary(message)):.0f} us")
    server.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
