"""The HTTP server: uvicorn with httptools, hardened against clients that misbehave on purpose.

uvicorn has no limit on how long a client may take to send its request headers, nor on their size or count
(its h11 backend has a size limit, httptools none). Here a protocol subclass adds, per connection:
- a header deadline: from connection (or the end of the previous response on a keep-alive connection) to the end
  of the request headers; past it the connection gets ``408`` and is closed (slowloris);
- a header size and count limit: past it ``431`` and close, before more is buffered;
- a body deadline: a request whose body has not all arrived ``body_timeout`` (+1 s) after its headers gets ``408``
  and the connection closes, also where the application is still waiting for the first byte of it.
The application's own deadline (requestio.read_body) usually answers first, as an OpenAI-shaped 408.

``X-Forwarded-*`` headers are trusted only from the proxies listed in ``forwarded_allow_ips``; by default from
nobody (uvicorn would trust loopback peers).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from .clientwriter import CLIENT_WRITER
from .eager import PassBudget, start_eager
from .errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimeout, render
from .protocol import ROUTES
from .settings import Settings
from .writebatch import BatchedTransport, WriteBatcher

EAGER_PATHS = frozenset(ROUTES)  # the generation routes start eagerly (see _start_asgi_task)
EAGER_PER_PASS = 4  # eager starts per loop pass (app.eager): a light or bursty load's requests, not saturation's
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    pass


class ClientLink:
    """Writes generation responses straight to the client's connection (``streaming.ClientWriter``).

    uvicorn's ASGI ``send`` costs a message dict, a dozen checks and one socket write per call: a stream's head,
    each chunk and its end would be separate writes (syscalls, and separate TCP segments for the client to wake up
    for). Here the head goes out with the first chunk, and a stream that is already complete (a short answer)
    goes out in one write. uvicorn's bookkeeping of the response is kept as its ``send`` keeps it (started,
    complete, keep-alive, the next pipelined request), so anything may still go through ``send`` afterwards."""

    __slots__ = ("_cycle", "_on_lost")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle
        self._on_lost: Callable[[], None] | None = None

    def watch(self, on_lost: Callable[[], None]) -> bool:
        """Call ``on_lost`` if the connection is lost before the response is complete (from the server's own
        callback: no task per request waiting for it). False when it is lost already."""
        if self._cycle.disconnected:
            return False
        self._on_lost = on_lost
        return True

    def lost(self) -> None:
        """The connection is gone. uvicorn tells only its newest request; one ahead of it in a pipeline (a stream
        still running) learns it here, or it would write to a closed transport."""
        c = self._cycle
        c.disconnected = True
        c.message_event.set()  # a receive() waiting for more of the body returns http.disconnect
        on_lost = self._on_lost
        self.release()
        if on_lost is not None and not self._cycle.response_complete:
            on_lost()

    def drop(self) -> None:
        c = self._cycle
        c.disconnected = True  # (uvicorn logs an ASGI app that returns with its answer unfinished as an error)
        c.transport.abort()  # not close(): that would wait for the unread data to go, i.e. keep the socket for ever
        self.release()

    def release(self) -> None:
        """The response is over (or the connection is): let go of the exchange watching it and leave the
        request's scope. Both are reference cycles (scope -> link -> cycle -> scope; link -> exchange -> link)
        that refcounting can't free: left to the cyclic GC, the objects of every request cost a busy gateway
        ~10 % of its CPU in collections."""
        self._on_lost = None
        extensions: dict[str, Any] | None = self._cycle.scope.get("extensions")
        if extensions is not None and extensions.get(CLIENT_WRITER) is self:
            del extensions[CLIENT_WRITER]

    def complete(self) -> bool:
        return self._cycle.response_complete

    def can_start(self) -> bool:
        c = self._cycle
        return not c.response_started and not c.disconnected

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], framing: bytes) -> list[bytes]:
        c = self._cycle
        c.response_started = True
        c.waiting_for_100_continue = False
        if c.access_log:
            c.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(c.scope), c.scope["method"],
                                 get_path_with_query_string(c.scope), c.scope["http_version"], status)
        parts = [STATUS_LINE[status]]
        for name, value in c.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not c.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(framing)
        return parts

    def start(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, end: bool) -> None:
        """A chunked response's head and first chunk in one write (and its end, with ``end``)."""
        c = self._cycle
        if c.disconnected or c.response_started:
            return
        c.chunked_encoding = True
        parts = self._head(status, headers, b"transfer-encoding: chunked\r\n\r\n")
        if body:
            parts.append(b"%x\r\n%b\r\n" % (len(body), body))
        if end:
            parts.append(b"0\r\n\r\n")
        c.transport.write(b"".join(parts))
        if end:
            self._completed()

    def write(self, data: bytes) -> None:
        c = self._cycle
        if not c.disconnected and not c.response_complete:
            c.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end(self, data: bytes) -> None:
        c = self._cycle
        if c.disconnected or c.response_complete:
            return
        c.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n")
        self._completed()

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response with a Content-Length, in one write."""
        c = self._cycle
        if c.disconnected or c.response_started:
            return
        c.chunked_encoding = False
        parts = self._head(status, headers, b"content-length: %d\r\n\r\n" % len(body))
        parts.append(body)
        c.transport.write(b"".join(parts))
        self._completed()

    def _completed(self) -> None:
        c = self._cycle
        c.response_complete = True
        c.message_event.set()
        if not c.keep_alive:
            c.transport.close()
        c.on_response()

    @property
    def write_paused(self) -> bool:
        return self._cycle.flow.write_paused

    async def drain(self) -> None:
        c = self._cycle
        if c.flow.write_paused and not c.disconnected:
            await c.flow.drain()


class HardenedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and header size/count limits (class attributes, set
    by ``protocol_class``)."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    eager_paths: frozenset[str] = EAGER_PATHS
    eager_budget: PassBudget = PassBudget(EAGER_PER_PASS)  # one per server: protocol_class / configure_protocol
    write_batch: WriteBatcher = WriteBatcher()  # the same: the writes of one pass leave together (app.writebatch)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # raw bytes received since the request began, while still in its headers
        self._head_size = 0  # exact: request line + header fields parsed so far
        self._head_count = 0
        self._head_too_large = False
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._links: list[ClientLink] = []  # of this connection's requests whose responses are not complete
        self._parsing = False  # inside data_received's parse
        self._deferred: tuple[RequestResponseCycle, Any] | None = None  # a request to start when the read is parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(BatchedTransport(transport, self.write_batch))
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        super().connection_lost(exc)
        links, self._links = self._links, []
        for link in links:
            link.lost()

    def _arm(self) -> None:
        self._disarm()
        self._in_head = True
        self._head_bytes = self._head_count = self._head_size = 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes:  # started a request and stalled: say why; an idle connection is just closed
                self._refuse(RequestTimeout(f"request headers not received within {self.header_timeout:g} s"))
            else:
                self.transport.close()

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_expired(self, cycle: RequestResponseCycle) -> None:
        self._body_timer = None
        if cycle is self.cycle and cycle.more_body and not cycle.response_started and not self.transport.is_closing():
            self._refuse(RequestTimeout(f"request body not received within {self.body_timeout:g} s"))

    def _refuse(self, exc: GatewayError) -> None:
        """Answer with an OpenAI-shaped error and close: the request never reaches the application."""
        self._disarm()
        status, _, body = render(exc)
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, _REASONS[status], len(body)) + body)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        self._parsing = True
        try:
            super().data_received(data)
        finally:
            self._parsing = False
            deferred = self._deferred
            if deferred is not None:  # started whatever happened in the parse: never left behind
                self._deferred = None
                self._start_deferred(*deferred)
            cycle = self.cycle
            if cycle is not None and cycle.more_body and self._body_timer is None and not self._in_head:
                self._body_timer = self.loop.call_later(self.body_timeout + 1.0, self._body_expired, cycle)
        if self._in_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            # all of it is still header bytes (a value not yet complete): refuse before buffering more
            self._head_too_large = True
            self._refuse(HeadersTooLarge(self._too_large_message()))

    def _start_deferred(self, cycle: RequestResponseCycle, app: Any) -> None:
        if cycle.more_body or self.transport.is_closing() or not self.eager_budget.take(self.loop):
            super()._start_asgi_task(cycle, app)  # (a body still to come: its own deadline applies there)
            return
        context = contextvars.Context() if self.config.reset_contextvars else None
        task = start_eager(self.loop, cycle.run_asgi(app), context)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """A generation request whose head was parsed in this read starts once the read is parsed: eagerly (``eager``)
        when its body came with it and this loop pass's budget allows — up to the upstream write in this callback,
        ahead of the streams' relays that are ready in the same pass."""
        if self._parsing and cycle.scope["method"] == "POST" and cycle.scope["path"] in self.eager_paths:
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _too_large_message(self) -> str:
        return (f"request headers are larger than {self.max_header_bytes} bytes or have more than "
                f"{self.max_headers} fields")

    def send_400_response(self, msg: str) -> None:
        """What httptools refuses (two Content-Lengths, a control byte in a header, an unknown method, ...):
        uvicorn answers in plain text; here in OpenAI's shape, like every other error."""
        if self._head_too_large:
            self._refuse(HeadersTooLarge(self._too_large_message()))
        elif not self.transport.is_closing():
            self._refuse(InvalidRequest(f"{msg.rstrip('.')}: the request is not valid HTTP/1.1", param=None))

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm_body()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request of a keep-alive connection, pipelined right behind
            self._in_head = True
            self._head_bytes = 0
        self._head_count = self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._head_count > self.max_headers or self._head_size > self.max_header_bytes:
            self._head_too_large = True
            raise _HeadTooLarge  # httptools turns it into a parser error: uvicorn would answer 400, we 431
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and self.scope["method"] == "POST":
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]  # ASGI types extensions narrowly
            link = ClientLink(cycle)
            scope["extensions"] = {CLIENT_WRITER: link}
            self._links.append(link)

    def on_response_complete(self) -> None:
        if self._links:
            open_links = []
            for link in self._links:
                if link.complete():
                    link.release()
                else:
                    open_links.append(link)
            self._links = open_links
        pipelined = bool(self.pipeline)  # (uvicorn starts the next pipelined request here, taking it off the queue)
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and not pipelined:
            self._arm()  # the keep-alive idle timer runs too; the header deadline covers a slow next request


def configure_protocol(settings: Settings) -> None:
    """Set the limits on the protocol class itself: a gateway process started by uvicorn's multiprocess
    supervisor imports the class by name (a class made per settings does not cross a process spawn)."""
    HardenedHttpToolsProtocol.header_timeout = settings.header_timeout
    HardenedHttpToolsProtocol.body_timeout = settings.body_timeout
    HardenedHttpToolsProtocol.max_header_bytes = settings.max_header_bytes
    HardenedHttpToolsProtocol.max_headers = settings.max_headers
    HardenedHttpToolsProtocol.eager_budget = PassBudget(EAGER_PER_PASS)
    HardenedHttpToolsProtocol.write_batch = WriteBatcher(settings.write_batch)


PROTOCOL_PATH = "app.httpserver:HardenedHttpToolsProtocol"


def protocol_class(settings: Settings) -> type[HardenedHttpToolsProtocol]:
    return type("TokengateHttpProtocol", (HardenedHttpToolsProtocol,), {
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.body_timeout,
        "max_header_bytes": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        "eager_budget": PassBudget(EAGER_PER_PASS),
        "write_batch": WriteBatcher(settings.write_batch),
    })


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration every tokengate server uses (the CLI and the tests)."""
    trusted = settings.forwarded_allow_ips
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "loop": "uvloop", "http": protocol_class(settings),
        "lifespan": "on", "log_level": settings.log_level, "access_log": settings.access_log,
        "timeout_graceful_shutdown": max(1, int(settings.drain_timeout)), "server_header": False,
        "proxy_headers": bool(trusted), "forwarded_allow_ips": ",".join(trusted) if trusted else None,
        "timeout_keep_alive": 5, "backlog": 4096,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
