"""The load driver: streaming OpenAI requests over keep-alive HTTP/1.1 (asyncio Protocol + httptools).

Not the openai SDK nor httpx: their per-chunk cost would make the client the bottleneck at high concurrency
(bench/NOTES.md measures it).  One ``write`` per request; each network read is timestamped once and its SSE
``data:`` lines parsed with orjson.  Per request we keep what vLLM's ``bench serve`` keeps, as it defines it: TTFT
(send → the first chunk with ``choices``: vLLM's role chunk counts, it comes with the first token), ITL (every gap
between consecutive chunks with ``choices``), E2E (send → the last chunk with ``choices``; the usage chunk and
``[DONE]`` after it don't count), and the token counts from the server's ``usage`` (content chunks counted when it
sends none).  "Send" is before connecting where a request needs a new connection, as in vLLM.

Closed loop (``rate=None``): ``concurrency`` workers, each sending its next request when the last one ends.
Open loop: Poisson arrivals at ``rate`` req/s (``inf``: all at once, which is the closed loop); ``concurrency``
caps the requests in flight, and latency is measured from the actual send, not the arrival.  Either stops after
``requests`` sends or, with ``duration``, once that many seconds have passed (requests in flight are finished).
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

_ERROR_BODY_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: ``Endpoint.parse("http://host:8000/v1", chat=True)``."""

    scheme: str
    host: str
    port: int
    base_path: str  # the URL's path without a trailing "/v1"
    chat: bool = True
    api_key: str | None = None

    @classmethod
    def parse(cls, url: str, *, chat: bool = True, api_key: str | None = None) -> Endpoint:
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        path = parts.path.rstrip("/")
        # a whole endpoint pasted as the URL ("…/v1/chat/completions") names the same server
        for route in ("/chat/completions", "/completions"):
            if path.endswith("/v1" + route):
                path = path.removesuffix(route)
                break
        path = path.removesuffix("/v1")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, path, chat, api_key)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"

    @property
    def path(self) -> str:
        return self.base_path + ("/v1/chat/completions" if self.chat else "/v1/completions")

    def request(self, body: bytes) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        head = [f"POST {self.path} HTTP/1.1", f"host: {host}:{self.port}", "content-type: application/json",
                f"content-length: {len(body)}", "accept: text/event-stream"]
        if self.api_key:
            head.append(f"authorization: Bearer {self.api_key}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class RequestResult:
    start: float  # perf_counter() at send
    ttft: float | None = None  # seconds to the first content chunk
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    chunks: int = 0  # SSE events that carried content
    output_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    status: int = 0
    error: str | None = None  # a short kind: http_503, timeout, connect, stream_error, ...
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count, else the content chunks."""
        return self.output_tokens if self.output_tokens is not None else self.chunks


@dataclass(slots=True)
class Progress:
    """Live counters for a progress line; the driver only increments them."""

    sent: int = 0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = 0.0

    @property
    def in_flight(self) -> int:
        return self.sent - self.done


@dataclass(slots=True)
class RunResult:
    records: list[RequestResult]
    started: float  # perf_counter() of the first send
    duration: float  # first send → last completion


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.keep_alive = True
        self.fut: asyncio.Future[RequestResult] | None = None
        self.rec = RequestResult(0.0)
        self._now = 0.0
        self._last = 0.0
        self._rest = b""
        self._body: list[bytes] = []
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish("connection_closed", f"connection closed mid-response{f': {exc}' if exc else ''}")

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish("bad_response", f"bad HTTP response: {exc}")
            self.close()

    def on_headers_complete(self) -> None:
        self.rec.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        if self.rec.status != 200:
            if sum(map(len, self._body)) < _ERROR_BODY_LIMIT:
                self._body.append(data)
            return
        buf = self._rest + data if self._rest else data
        lines = buf.split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, payload: bytes) -> None:
        rec = self.rec
        if payload == b"[DONE]":
            self._done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            rec.error = rec.error or "bad_event"
            rec.detail = rec.detail or payload[:200].decode(errors="replace")
            return
        if not isinstance(obj, dict):
            return
        err = obj.get("error")
        if err and rec.error is None:
            rec.error = "stream_error"
            rec.detail = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            now = self._now  # (vLLM's timing: every chunk with choices, content or not)
            if rec.ttft is None:
                rec.ttft = now - rec.start
            else:
                rec.itl.append(now - self._last)
            self._last = now
            c = choices[0]
            if isinstance(c, dict):
                delta = c.get("delta")
                piece = (delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                         if isinstance(delta, dict) else c.get("text"))
                if piece:
                    rec.chunks += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                rec.output_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                rec.prompt_tokens = usage["prompt_tokens"]

    def on_message_complete(self) -> None:
        rec = self.rec
        if rec.status != 200:
            self._finish(f"http_{rec.status}", _error_message(b"".join(self._body)))
        elif rec.error is not None:
            self._finish(rec.error, rec.detail)
        elif rec.chunks == 0 and not rec.output_tokens:
            self._finish("empty_stream", "the stream carried no content" + ("" if self._done else " and no [DONE]"))
        else:
            self._finish(None, None)

    def _finish(self, error: str | None, detail: str | None) -> None:
        fut = self.fut
        if fut is None or fut.done():
            return
        rec = self.rec
        # a whole answer ends at its last chunk with choices (vLLM's latency); a failed one when it failed
        rec.e2e = (self._last if error is None and rec.ttft is not None else time.perf_counter()) - rec.start
        rec.error, rec.detail = error, detail
        fut.set_result(rec)

    def send(self, request: bytes, start: float | None = None) -> asyncio.Future[RequestResult]:
        """``start``: when the request began, if before this call (its connection was opened for it)."""
        assert self.transport is not None
        self.rec = RequestResult(time.perf_counter() if start is None else start)
        self._rest, self._body, self._done = b"", [], False
        self.fut = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.fut

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self.transport is not None and not self.transport.is_closing()


def _error_message(body: bytes) -> str:
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode(errors="replace")
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])[:300]
    return str(err)[:300]


class Driver:
    """Sends one shape's requests. ``body(i)`` gives the JSON body of the i-th request."""

    def __init__(self, endpoint: Endpoint, body: Callable[[int], bytes], *, timeout: float = 600.0,
                 progress: Progress | None = None) -> None:
        self.endpoint = endpoint
        self.body = body
        self.timeout = timeout
        self.progress = progress or Progress()
        self._ssl = ssl.create_default_context() if endpoint.scheme == "https" else None
        self._idle: list[_Conn] = []
        self._records: list[RequestResult] = []

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        _, conn = await loop.create_connection(_Conn, ep.host, ep.port, ssl=self._ssl)
        return conn

    async def _one(self, i: int, conn: _Conn | None) -> _Conn | None:
        """Send request i on ``conn`` (or a new connection); returns the connection if it can be reused."""
        p = self.progress
        p.sent += 1
        request = self.endpoint.request(self.body(i))
        t0: float | None = None
        if conn is None or not conn.reusable:
            if conn is not None:
                conn.close()
            t0 = time.perf_counter()
            try:
                conn = await asyncio.wait_for(self._connect(), self.timeout)
            except (OSError, TimeoutError) as exc:
                self._record(RequestResult(t0, e2e=time.perf_counter() - t0, error="connect",
                                           detail=f"{type(exc).__name__}: {exc}"[:300]))
                await asyncio.sleep(0.05)  # a refused port must not become a busy loop
                return None
        fut = conn.send(request, t0)
        try:
            rec = await asyncio.wait_for(fut, self.timeout)
        except TimeoutError:
            conn.close()
            rec = conn.rec
            rec.e2e = time.perf_counter() - rec.start
            rec.error, rec.detail = "timeout", f"no end after {self.timeout:g} s"
        self._record(rec)
        return conn if conn.reusable else None

    def _record(self, rec: RequestResult) -> None:
        self._records.append(rec)
        p = self.progress
        p.done += 1
        if rec.ok:
            p.tokens += rec.tokens
        else:
            p.failed += 1

    async def run(self, *, concurrency: int, requests: int | None = None, duration: float | None = None,
                  rate: float | None = None, seed: int = 0) -> RunResult:
        if requests is None and duration is None:
            raise ValueError("give requests or duration")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._records = []
        t0 = time.perf_counter()
        self.progress.started = t0
        deadline = t0 + duration if duration is not None else math.inf
        limit = requests if requests is not None else math.inf
        if rate is None or rate == math.inf:  # all at once, capped by concurrency: the closed loop
            await self._closed_loop(concurrency, limit, deadline)
        else:
            await self._open_loop(concurrency, limit, deadline, rate, seed)
        for c in self._idle:
            c.close()
        self._idle.clear()
        end = max((r.start + r.e2e for r in self._records), default=t0)
        start = min((r.start for r in self._records), default=t0)
        return RunResult(self._records, start, max(end - start, 1e-9))

    async def _closed_loop(self, concurrency: int, limit: float, deadline: float) -> None:
        counter = iter(range(2**62))

        async def worker() -> None:
            conn: _Conn | None = None
            while time.perf_counter() < deadline:
                i = next(counter)
                if i >= limit:
                    break
                conn = await self._one(i, conn)
            if conn is not None:
                conn.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def _open_loop(self, concurrency: int, limit: float, deadline: float, rate: float, seed: int) -> None:
        rng = random.Random(seed)
        gate = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            async with gate:
                conn = self._idle.pop() if self._idle else None
                conn = await self._one(i, conn)
                if conn is not None:
                    self._idle.append(conn)

        at = time.perf_counter()
        i = 0
        while i < limit:
            if i:  # the first at once, then Poisson gaps (as vLLM's bench serve sends): the run starts with a send
                at += rng.expovariate(rate)
            if at > deadline:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        while tasks:
            await asyncio.gather(*tasks)
