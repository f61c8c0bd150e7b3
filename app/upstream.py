"""The one HTTP client to workers: HTTP/1.1 keep-alive over plain asyncio, parsed by httptools.  This module is
the pool and the response a caller holds; one connection, its parsing and its flow control are
``workerconn.WorkerConnection``.

Why not httpx or aiohttp: the relay's cost per request is dominated by the client (bench/NOTES.md measures the
three); this client does one write per request and hands body bytes over as they arrive, without per-chunk
objects, tasks or generators.  Foreign errors are mapped here, at the boundary: a refused or reset connection is
``UpstreamError`` (502), a missing answer ``UpstreamTimeout`` (504).

Flow control both ways: a response whose reader falls behind pauses the socket (bounded memory per stream), and
``abort()`` closes the connection, which is how vLLM learns that the client has gone.
"""

from __future__ import annotations

import asyncio
import errno
import ssl as ssl_module
import time
from collections.abc import Iterable

from .errors import GatewayOverloaded, UpstreamError, UpstreamTimeout
from .workerconn import (
    Origin,
    Sink,
    UpstreamAborted,
    UpstreamClosed,
    UpstreamProtocolError,
    WorkerConnection,
)
from .writebatch import MAX_BATCH, WriteBatcher

__all__ = ["Origin", "Sink", "UpstreamAborted", "UpstreamClosed", "UpstreamPool", "UpstreamProtocolError",
           "UpstreamResponse"]


class UpstreamResponse:
    """A response being received. ``release()`` (or ``abort()``) must be called exactly once."""

    __slots__ = ("_conn", "status", "headers", "_done")

    def __init__(self, conn: WorkerConnection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def next_chunk(self, timeout: float) -> bytes | None:
        return await self._conn.next_chunk(timeout)

    async def read(self, timeout: float, limit: int = 64 * 1024 * 1024) -> bytes:
        parts: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            chunk = await self._conn.next_chunk(max(0.001, deadline - loop.time()))
            if chunk is None:
                return b"".join(parts)
            size += len(chunk)
            if size > limit:
                self.abort()
                raise UpstreamProtocolError(f"worker response larger than {limit} bytes")
            parts.append(chunk)

    def attach(self, sink: Sink) -> None:
        """From now on the body goes to ``sink`` as it arrives (what is buffered already, at once); until
        ``detach()``. ``next_chunk``/``read`` are not used meanwhile."""
        self._conn.attach(sink)

    def detach(self) -> None:
        self._conn.detach()

    def pause_reading(self) -> None:
        """Sink mode's flow control: stop reading from the worker until ``resume_reading()``."""
        transport = self._conn.transport
        if transport is not None and not self._conn.closed:
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._conn.transport
        if transport is not None and not self._conn.closed:
            transport.resume_reading()

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.reusable():
            conn.pool.put(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def abort(self, reason: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._conn.abort(reason or UpstreamAborted("aborted"))


class UpstreamPool:
    """Keep-alive connections per origin. Idle connections older than ``idle_ttl`` are not reused
    (vLLM's uvicorn closes idle connections after 5 s; reusing one it is closing would fail the request)."""

    def __init__(self, *, connect_timeout: float = 5.0, idle_ttl: float = 4.0, max_idle_per_origin: int = 1024,
                 ssl_context: ssl_module.SSLContext | None = None, write_batch: int = MAX_BATCH) -> None:
        self.connect_timeout = connect_timeout
        self.batch = WriteBatcher(write_batch)  # the requests of one loop pass leave together (app.writebatch)
        self.idle_ttl = idle_ttl
        self.max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[WorkerConnection]] = {}
        self._all: set[WorkerConnection] = set()
        self._ssl = ssl_context

    def forget(self, conn: WorkerConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def put(self, conn: WorkerConnection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            assert conn.transport is not None
            conn.transport.close()
            return
        conn.reset()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, origin: Origin) -> WorkerConnection:
        loop = asyncio.get_running_loop()
        ssl_ctx: ssl_module.SSLContext | None = None
        if origin.scheme == "https":
            ssl_ctx = self._ssl or ssl_module.create_default_context()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: WorkerConnection(origin, self, self.batch), origin.host, origin.port,
                                       ssl=ssl_ctx),
                self.connect_timeout,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"could not connect to worker {origin.host}:{origin.port} within {self.connect_timeout:g} s",
                code="worker_connect_timeout",
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # ours, not the worker's: say so, don't blame it
                raise GatewayOverloaded("the gateway has no file descriptors left for a worker connection "
                                        "(raise its open-file limit, or add gateway replicas)", retry_after=1) from exc
            raise UpstreamError(f"worker {origin.host}:{origin.port} unreachable: {exc.strerror or exc}") from exc
        self._all.add(proto)
        return proto

    def _take_idle(self, origin: Origin) -> WorkerConnection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            alive = not conn.closed and conn.transport is not None and not conn.transport.is_closing()
            if alive and now - conn.idle_since < self.idle_ttl:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def request(self, origin: Origin, method: str, path: str, body: bytes = b"", *,
                      headers: Iterable[tuple[str, str]] = (), timeout: float = 600.0) -> UpstreamResponse:
        """Send one request and wait for the response headers (the body is read from the response)."""
        head_parts = [f"{method} {path} HTTP/1.1\r\nhost: ".encode(), origin.host_header, b"\r\n"]
        for name, value in headers:
            head_parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body or method in ("POST", "PUT", "PATCH"):
            head_parts.append(b"content-length: %d\r\n" % len(body))
        head_parts.append(b"\r\n")
        head = b"".join(head_parts)
        for attempt in (0, 1):
            conn = self._take_idle(origin) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(origin)
            try:
                conn.send(head, body)
                await conn.wait_headers(timeout)
                return UpstreamResponse(conn)
            except UpstreamClosed:
                conn.abort(UpstreamAborted("closed"))
                if attempt == 0 and reused and not conn.got_bytes:
                    continue  # a kept-alive connection the worker had just closed: retry once on a fresh one
                raise
            except BaseException:
                conn.abort(UpstreamAborted("abandoned"))
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        for conn in list(self._all):
            if conn.transport is not None:
                conn.transport.close()
        self._all.clear()
        self._idle.clear()
