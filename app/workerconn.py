"""One keep-alive HTTP/1.1 connection to a worker, parsed by httptools (``upstream.UpstreamPool`` keeps them).

It carries one response at a time. The body goes either to a task that awaits it (``wait_headers``,
``next_chunk``) or, attached as a ``Sink``, straight from the connection's own callbacks. A reader that falls
behind pauses the socket, which bounds the memory per stream; ``abort()`` closes the connection. Foreign errors
are mapped here: a worker that closes early is ``UpstreamClosed``, malformed HTTP ``UpstreamProtocolError``, and
silence past a deadline ``UpstreamTimeout``. A response's headers are bounded (``MAX_HEAD_BYTES``); bytes from the
worker that belong to no request (a second response, or anything while the connection is idle) close the
connection, so they can't be read as the answer to the next request on it; a response without a length or
chunked framing ends when the worker closes the connection (RFC 9112 6.3).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from .errors import UpstreamError, UpstreamTimeout
from .writebatch import WriteBatcher

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # a response's header names and values together (vLLM's: a few hundred bytes)
MAX_HEADERS = 256
_NO_BODY = frozenset({204, 304})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


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


class Owner(Protocol):
    """The pool a connection belongs to: told when the connection is lost, given it back when a response is done."""

    def forget(self, conn: WorkerConnection) -> None: ...

    def put(self, conn: WorkerConnection) -> None: ...


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


class WorkerConnection(asyncio.Protocol):
    """One keep-alive connection; carries one response at a time."""

    __slots__ = ("origin", "transport", "parser", "status", "headers", "_headers_done", "_buf", "_buffered",
                 "_paused", "_complete", "_closed", "_exc", "_waiter", "_keep_alive", "_got_bytes", "idle_since",
                 "pool", "_sink", "_sent", "_head_bytes", "_framed", "_interim", "_batch", "on_body")

    def __init__(self, origin: Origin, pool: Owner, batch: WriteBatcher | None = None) -> None:
        self.origin = origin
        self.pool = pool
        self._batch = batch  # the request goes out with the others of this loop pass; None: at once
        self.transport: asyncio.Transport | None = None
        self._buf: deque[bytes] = deque()
        # httptools' body callback, once per HTTP chunk (vLLM sends each SSE event as one): the buffer's own append,
        # no Python frame per chunk; what a read buffered is counted and bounded once per read (data_received)
        self.on_body: Callable[[bytes], None] = self._buf.append
        self.parser = httptools.HttpResponseParser(self)
        self._closed = False
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on this connection (keep-alive)."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._buf.clear()
        self._buffered = 0  # bytes read since the buffer was last taken (an upper bound of the body bytes in it)
        self._paused = False
        self._complete = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._keep_alive = True
        self._got_bytes = False
        self._sink: Sink | None = None
        self._sent = False  # a request went out: until then nothing may arrive
        self._head_bytes = 0
        self._framed = False  # a content-length or transfer-encoding: else the body ends with the connection
        self._interim = False  # parsing a 1xx response: skipped, the final one follows

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if not self._sent:
            self._fail(UpstreamProtocolError("worker sent bytes while no request was waiting for them"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - workers never upgrade
            self._fail(UpstreamProtocolError("worker tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"malformed HTTP from worker: {exc}"))
        if self._sink is not None:
            self._feed_sink()
        elif self._buf:
            self._buffered += len(data)
            if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True  # a reader that falls behind: stop reading until it takes the buffer
                self.transport.pause_reading()
            self._wake()  # once for what this read brought (a short answer: its every chunk, with the head)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.pool.forget(self)
        if self._headers_done and not self._framed and self._exc is None:
            self._complete = True  # the close is how such a response ends
        if not self._complete and self._exc is None:
            self._exc = UpstreamClosed("worker closed the connection before the response was complete")
        self._wake()
        if self._sink is not None:
            self._feed_sink()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES or len(self.headers) >= MAX_HEADERS:
            self._fail(UpstreamProtocolError(f"worker sent response headers over {MAX_HEAD_BYTES // 1024} KiB "
                                             f"or {MAX_HEADERS} fields"))
            raise _Stray
        name = name.lower()
        if name in _FRAMING:
            self._framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._headers_done:  # a second response to one request
            self._fail(UpstreamProtocolError("worker sent more than one response to one request"))
            raise _Stray
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue, 103 Early Hints (101 is an upgrade, refused): the final response follows
            self._interim = True
            self.headers = []
            self._head_bytes = 0
            self._framed = False
            return
        self.status = status
        self._keep_alive = self.parser.should_keep_alive()
        self._headers_done = True
        if status in _NO_BODY:
            self._framed = True  # no body at all
        elif not self._framed:
            self._keep_alive = False
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
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
        self._sent = True
        parts = (head + body,) if len(body) < 65536 else (head, body)
        batch = self._batch
        if batch is not None:
            for part in parts:
                batch.write(transport, part, self._unsent)
            return
        try:
            for part in parts:
                transport.write(part)
        except (RuntimeError, OSError) as exc:  # uvloop: "the handler is closed" when the peer just went away
            raise UpstreamClosed(f"worker closed the connection before the request was sent: {exc}") from None

    def _unsent(self, exc: BaseException) -> None:
        """The batched request could not be written: the connection closed before its turn."""
        self._fail(UpstreamClosed(f"worker closed the connection before the request was sent: {exc}"))

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

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def got_bytes(self) -> bool:
        """Anything arrived on it for the current request (a reused connection that gets nothing may retry)."""
        return self._got_bytes

    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self._closed and self._exc is None

    def abort(self, exc: BaseException) -> None:
        self._fail(exc)


class _Stray(Exception):
    """Stops httptools in a callback (the connection has failed already)."""


def _expire(waiter: asyncio.Future[None], what: str, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(f"worker sent no {what} within {timeout:g} s"))
