"""The one HTTP client to workers: HTTP/1.1 keep-alive over plain asyncio, parsed by httptools.

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
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from .errors import GatewayOverloaded, UpstreamError, UpstreamTimeout

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class UpstreamClosed(UpstreamError):
    """The worker closed the connection before the response was complete."""

    code = "worker_disconnected"


class UpstreamProtocolError(UpstreamError):
    code = "bad_worker_response"


class UpstreamAborted(Exception):
    """We closed the connection ourselves (the client went away)."""


class Sink(Protocol):
    """Takes a response body as it arrives, from the connection's own callbacks (no task wake-up per read)."""

    def on_data(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_error(self, exc: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def host_header(self) -> bytes:
        default = 443 if self.scheme == "https" else 80
        return (self.host if self.port == default else f"{self.host}:{self.port}").encode()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    __slots__ = ("origin", "transport", "parser", "status", "headers", "_headers_done", "_buf", "_buffered",
                 "_paused", "_complete", "_closed", "_exc", "_waiter", "_keep_alive", "_got_bytes", "idle_since",
                 "pool", "_sink")

    def __init__(self, origin: Origin, pool: UpstreamPool) -> None:
        self.origin = origin
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._complete = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_alive = True
        self._got_bytes = False
        self._sink: Sink | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - workers never upgrade
            self._fail(UpstreamProtocolError("worker tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"malformed HTTP from worker: {exc}"))
        if self._sink is not None:
            self._feed_sink()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.pool._forget(self)
        if not self._complete and self._exc is None:
            self._exc = UpstreamClosed("worker closed the connection before the response was complete")
        self._wake()
        if self._sink is not None:
            self._feed_sink()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._keep_alive = self.parser.should_keep_alive()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._buf.append(body)
        self._buffered += len(body)
        if self._sink is not None:
            return  # handed over in one piece when this read has been parsed (_feed_sink)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # internals
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _feed_sink(self) -> None:
        """Sink mode: what this read brought, in one call, then the end (or the failure) once it is known."""
        sink = self._sink
        assert sink is not None
        if self._buf:
            data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
            self._buf.clear()
            self._buffered = 0
            sink.on_data(data)
        if self._sink is None:
            return  # the sink let go while taking the data
        if self._complete:
            sink.on_end()
        elif self._exc is not None:
            sink.on_error(self._exc)

    def attach(self, sink: Sink) -> None:
        self._sink = sink
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._feed_sink()

    def detach(self) -> None:
        self._sink = None

    async def _wait(self, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(timeout, _expire, waiter, what, timeout)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None

    def send(self, head: bytes, body: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            raise UpstreamClosed("worker closed the connection before the request was sent")
        try:
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
        except (RuntimeError, OSError) as exc:  # uvloop: "the handler is closed" when the peer just went away
            raise UpstreamClosed(f"worker closed the connection before the request was sent: {exc}") from None

    async def wait_headers(self, timeout: float) -> None:
        while not self._headers_done:
            if self._exc is not None:
                raise self._exc
            await self._wait(timeout, "response headers")

    async def next_chunk(self, timeout: float) -> bytes | None:
        """All body bytes buffered so far (waiting up to ``timeout`` for some), or None at the end."""
        while True:
            if self._buf:
                data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
                self._buf.clear()
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._complete:
                return None
            if self._exc is not None:
                raise self._exc
            await self._wait(timeout, "more of the response")

    @property
    def complete(self) -> bool:
        return self._complete

    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self._closed and self._exc is None

    def abort(self, exc: BaseException) -> None:
        self._fail(exc)


def _expire(waiter: asyncio.Future[None], what: str, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"worker sent no {what} within {timeout:g} s"))


class UpstreamResponse:
    """A response being received. ``release()`` (or ``abort()``) must be called exactly once."""

    __slots__ = ("_conn", "status", "headers", "_done")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

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
        if transport is not None and not self._conn._closed:
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._conn.transport
        if transport is not None and not self._conn._closed:
            transport.resume_reading()

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        conn = self._conn
        if conn.reusable():
            conn.pool._put(conn)
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
                 ssl_context: ssl_module.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.idle_ttl = idle_ttl
        self.max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._ssl = ssl_context

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            assert conn.transport is not None
            conn.transport.close()
            return
        conn._reset()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        ssl_ctx: ssl_module.SSLContext | None = None
        if origin.scheme == "https":
            ssl_ctx = self._ssl or ssl_module.create_default_context()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(origin, self), origin.host, origin.port, ssl=ssl_ctx),
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

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            alive = not conn._closed and conn.transport is not None and not conn.transport.is_closing()
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
                if attempt == 0 and reused and not conn._got_bytes:
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
