"""Handing a working set's sealed memfd to its worker over a unix socket (SCM_RIGHTS).

gRPC cannot carry file descriptors, so the daemon listens on a second unix socket beside
its gRPC one (`ShmRef.fd_socket`). The exchange, one per connection, is plain text:

    worker -> daemon   "<session_id> <capability>\\n"      (at most MAX_REQUEST bytes)
    daemon -> worker   b"ok" with the fd as SCM_RIGHTS ancillary data,
                       or b"error: <status>: <message>" and no fd

The daemon looks the session up exactly as an RPC would (a wrong capability is NOT_FOUND),
and hands out a duplicate of the fd: the worker maps and closes it, the daemon's stays open
until the session closes. The kernel tells the daemon who connected (SO_PEERCRED); the
daemon logs the pid and uid with the session it served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("kvrecall.fdpass")

MAX_REQUEST = 256
REQUEST_TIMEOUT = 5.0


class FdPassError(RuntimeError):
    """The daemon refused (or could not serve) a file-descriptor request."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def receive_fd(path: str, session_id: str, capability: str, timeout: float = REQUEST_TIMEOUT) -> int:
    """Worker side: ask the daemon at `path` for the session's segment; returns the fd (the
    caller owns it)."""
    request = f"{session_id} {capability}\n".encode()
    if len(request) > MAX_REQUEST:
        raise FdPassError("session_id and capability are too long")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        message, fds, _, _ = socket.recv_fds(sock, 1024, 1)
    if message == b"ok" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        os.close(fd)
    raise FdPassError(message.decode(errors="replace") or "the daemon closed the connection")


class FdServer:
    """Daemon side: answers fd requests on `path` from the event loop. `lookup(session_id,
    capability)` returns a file descriptor the server may send (it is not closed here) or
    raises an exception whose `code`/`message` (KVRecallError) or str becomes the refusal."""

    def __init__(self, path: str, mode: int, lookup: Callable[[str, str], int]) -> None:
        self.path = path
        self.mode = mode
        self.lookup = lookup
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._serving: set[asyncio.Task] = set()

    async def start(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. out of file descriptors: keep serving once it passes
                log.warning("fd socket %s: accept failed: %s", self.path, exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn))
            self._serving.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                raw = await asyncio.wait_for(self._read_request(loop, conn), REQUEST_TIMEOUT)
                session_id, capability = raw.decode("ascii").split()
            except (TimeoutError, UnicodeDecodeError, ValueError, OSError):
                await self._send(loop, conn, b"error: INVALID_ARGUMENT: expected '<session_id> <capability>\\n'")
                return
            try:
                fd = self.lookup(session_id, capability)
            except Exception as exc:  # noqa: BLE001 - every refusal is an answer
                code = getattr(getattr(exc, "code", None), "name", "INTERNAL")
                await self._send(loop, conn, f"error: {code}: {getattr(exc, 'message', exc)}".encode())
                return
            pid, uid, _ = peer_credentials(conn)
            try:
                socket.send_fds(conn, [b"ok"], [fd])  # a few bytes on a fresh socket: never blocks
            except OSError as exc:
                log.warning("session %s: could not send its segment to pid %d: %s", session_id, pid, exc)
                return
            log.info("session %s: working-set segment sent to pid %d (uid %d)", session_id, pid, uid)

    @staticmethod
    async def _read_request(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
        raw = b""
        while not raw.endswith(b"\n"):
            chunk = await loop.sock_recv(conn, MAX_REQUEST)
            if not chunk or len(raw) + len(chunk) > MAX_REQUEST:
                raise ValueError("request too long or cut short")
            raw += chunk
        return raw

    @staticmethod
    async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, message: bytes) -> None:
        try:
            await loop.sock_sendall(conn, message)
        except OSError:
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
