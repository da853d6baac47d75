"""The gRPC floor of one Decode-like round trip on this machine: a bare grpc.aio bidi stream
(and a unary call) echoing 64 bytes over a unix socket, server in another process, with and
without an asyncio.to_thread hop per message. Usage: python scripts/grpc_echo_floor.py plain|thread proc"""
import asyncio
import os
import queue
import statistics
import sys
import tempfile
import threading
import time

import grpc

SOCK = "unix://" + os.path.join(tempfile.mkdtemp(), "s.sock")
mode = sys.argv[1]  # plain | thread

async def serve(ready):
    async def bidi(request_iterator, context):
        async for req in request_iterator:
            if mode == "thread":
                await asyncio.to_thread(lambda: None)
            yield req
    async def unary(req, context):
        if mode == "thread":
            await asyncio.to_thread(lambda: None)
        return req
    handler = grpc.method_handlers_generic_handler("x.X", {
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(SOCK)
    await server.start()
    ready.set()
    await server.wait_for_termination()

def run_server(ready):
    try:
        import uvloop; uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(ready))

ready = threading.Event()
if sys.argv[2] == "proc":
    import multiprocessing as mp
    ev = mp.Event(); p = mp.Process(target=run_server, args=(ev,), daemon=True); p.start(); ev.wait()
else:
    threading.Thread(target=run_server, args=(ready,), daemon=True).start(); ready.wait()
ch = grpc.insecure_channel(SOCK)
bidi = ch.stream_stream("/x.X/Bidi")
unary = ch.unary_unary("/x.X/Unary")
q = queue.Queue()
def it():
    while True:
        yield q.get()
resp = bidi(it())
msg = b"x" * 64
def rt_stream():
    q.put(msg); next(resp)
def rt_unary():
    unary(msg)
for name, f in (("stream", rt_stream), ("unary", rt_unary)):
    for _ in range(200): f()
    ts = []
    for _ in range(2000):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    print(mode, name, f"p50 {1e6*statistics.median(ts):.0f} us")
