"""The generation routes as one pure-ASGI endpoint: parse → caps → route → upstream → relay → metrics.

Pure ASGI on purpose (no BaseHTTPMiddleware, no Request/Response objects): this path runs for every request and
every streamed chunk.  Errors raised before the first byte become an HTTP error response; after it, the relay
speaks in-band.  A client that goes away cancels the handler wherever it waits, and the upstream request is
aborted by closing its connection, which vLLM turns into an engine abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import Any

import orjson

from .aggregate import StreamAggregator
from .caps import CapConfig, Caps, Decision, decide
from .counting import PromptCounter
from .errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    MaxTokensExceeded,
    ModelNotFound,
    NoWorkerAvailable,
    PayloadTooLarge,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
    render,
    sse_event,
    status_of,
)
from .metrics import UNKNOWN, GatewayMetrics, RequestRecord
from .protocol import ROUTES, ParsedRequest, Route, parse_request, set_max_tokens, upstream_body
from .routing import affinity_key, candidates, pick
from .settings import Settings
from .streaming import SSEParser, relay
from .tokenizer import TokenizerStore
from .upstream import UpstreamClosed, UpstreamPool, UpstreamProtocolError, UpstreamResponse
from .workers.registry import ModelInfo, Registry, Worker

_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_RETRIABLE_STATUS = (502, 503)
CLAMP_HEADER = b"x-tokengate-max-tokens-clamped"
REGION_HEADER = b"x-tokengate-region"


@dataclass(slots=True)
class _Ctx:
    task: asyncio.Task[Any] | None
    started: bool = False
    done: bool = False
    client_gone: bool = False
    worker: Worker | None = None
    resp: UpstreamResponse | None = None
    request_id: str = ""
    parser: SSEParser | None = None
    decision: Decision | None = None
    stream: bool = True
    gauge: Any = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class _ClientGone(Exception):
    """The client went away before its request body was complete."""


def _error_kind(exc: GatewayError) -> str:
    if isinstance(exc, UpstreamStatus):
        return "status_5xx" if exc.passthrough_status >= 500 else "status_4xx"
    if isinstance(exc, UpstreamTimeout):
        return "connect_timeout" if exc.error_code == "worker_connect_timeout" else "timeout"
    if isinstance(exc, UpstreamClosed):
        return "closed"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    return "unreachable"


class Proxy:
    def __init__(self, *, settings: Settings, registry: Registry, pool: UpstreamPool, metrics: GatewayMetrics,
                 tokenizers: TokenizerStore, counter: PromptCounter, default_caps: CapConfig,
                 preset_caps: dict[str, CapConfig] | None = None, regions: set[str] | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.counter = counter
        self.default_region = settings.default_region
        self.fallback_regions = settings.fallbacks()
        self.configured_regions = set(regions or ()) | {self.default_region} | set(self.fallback_regions)
        self.default_caps = default_caps
        self.preset_caps = preset_caps or {}
        self._turn = 0
        self._background: set[asyncio.Task[None]] = set()
        self._caps: dict[tuple[str, int, tuple[str, ...]], Caps] = {}
        self.draining = False

    # ASGI entry point for both generation routes
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.handle(ROUTES[scope["path"]], scope, receive, send)

    def caps_for(self, model: str, info: ModelInfo, pool: tuple[Worker, ...] = ()) -> Caps:
        presets = tuple(sorted({f"{w.region}/{w.preset}" for w in pool}))
        key = (model, info.max_model_len, presets)
        caps = self._caps.get(key)
        if caps is None:
            configs = [self.preset_caps.get(p, self.default_caps) for p in presets] or [self.default_caps]

            caps = configs[0].build(info.max_model_len)
            for cfg in configs[1:]:
                caps = caps.tighten(cfg.build(info.max_model_len))
            self._caps[key] = caps
        return caps

    async def handle(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        arrival = perf_counter()
        ctx = _Ctx(asyncio.current_task())
        rec = RequestRecord(route, UNKNOWN, "", "", "", 0, arrival, arrival)
        watcher: asyncio.Task[None] | None = None
        try:
            region, request_id, length = _read_headers(scope)
            try:
                raw = await _read_body(receive, length, self.settings.max_body_bytes)
            except _ClientGone:
                ctx.client_gone = True
                self._client_gone(route, ctx, rec)
                return
            watcher = asyncio.get_running_loop().create_task(self._watch(receive, ctx))
            await self._serve(route, raw, region, request_id, ctx, rec, send)
        except asyncio.CancelledError:
            if not ctx.client_gone or ctx.task is None:
                # the server is stopping (drain deadline passed): say so in-band rather than truncate
                rec.status = 503
                if ctx.started and not ctx.done:
                    ctx.done = True
                    with contextlib.suppress(Exception):
                        await send({"type": "http.response.body", "more_body": False, "body": sse_event(
                            NoWorkerAvailable("the gateway is shutting down", code="gateway_shutdown"))})
                raise
            ctx.task.uncancel()
            self._client_gone(route, ctx, rec)
        except GatewayError as exc:
            rec.status = status_of(exc)
            if not ctx.started:
                status, headers, body = render(exc)
                ctx.done = True
                await send({"type": "http.response.start", "status": status, "headers": headers + ctx.headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            ctx.done = True
            if watcher is not None:
                watcher.cancel()
            if ctx.resp is not None:
                ctx.resp.abort()
                if ctx.worker is not None:
                    self._abort_on_worker(ctx.worker, route, ctx.request_id)
            self._leave(ctx)
            rec.end = perf_counter()
            self.metrics.observe_request(rec)

    async def _watch(self, receive: Any, ctx: _Ctx) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not ctx.done and ctx.task is not None:
                    ctx.client_gone = True
                    ctx.task.cancel()
                return

    def _client_gone(self, route: Route, ctx: _Ctx, rec: RequestRecord) -> None:
        rec.status = 499
        rec.streamed = ctx.stream
        st = ctx.parser.state if ctx.parser is not None else None
        if st is not None:
            rec.first_token, rec.last_token = st.first_token, st.last_token
            usage = st.usage or {}
            rec.completion_tokens = usage.get("completion_tokens", st.content_events)
            rec.prompt_tokens = usage.get("prompt_tokens")
        if rec.prompt_tokens is None and ctx.decision is not None:
            rec.prompt_tokens = ctx.decision.prompt_tokens
        if ctx.worker is None and ctx.resp is None:
            phase = "before_dispatch"
        elif not ctx.stream:
            phase = "non_stream"
        else:
            phase = "streaming" if rec.first_token is not None else "before_first_token"
        self.metrics.client_disconnects.labels(route, rec.model, phase).inc()

    def _leave(self, ctx: _Ctx) -> None:
        worker = ctx.worker
        if worker is not None:
            worker.in_flight -= 1
            ctx.gauge.dec()
            ctx.worker = ctx.gauge = None

    async def _serve(self, route: Route, raw: bytes, region: str | None, request_id: str | None, ctx: _Ctx,
                     rec: RequestRecord, send: Any) -> None:
        req = parse_request(route, raw)
        ctx.stream = req.stream
        snapshot = self.registry.snapshot
        info = snapshot.models.get(req.model)
        if info is None:
            if any(req.model in w.models for w in snapshot.workers):
                rec.model = req.model
                raise NoWorkerAvailable(f"no worker serving '{req.model}' is ready yet", retry_after=5)
            raise ModelNotFound(f"The model `{req.model}` does not exist.", param="model")
        rec.model = req.model
        if self.draining:
            raise NoWorkerAvailable("the gateway is shutting down", retry_after=5)
        regions = self._regions(region, snapshot.workers)
        rec.region = regions[0]
        pool = candidates(snapshot, req.model, regions)
        if not pool:
            raise NoWorkerAvailable(
                f"no ready worker serves '{req.model}' in region '{regions[0]}'", retry_after=5,
                code="no_worker_in_region",
            )
        caps = self.caps_for(req.model, info, pool)
        size = self.counter.size(req, self.tokenizers.get(req.model), lambda p: self._remote_count(pool, p))
        try:
            ctx.decision = decision = await decide(
                caps, req.max_tokens, req.max_tokens_param, size,
                prompt_param="messages" if route == "chat" else "prompt", model=req.model,
            )
        except (MaxTokensExceeded, ContextLengthExceeded) as exc:
            reason = "max_tokens_cap" if isinstance(exc, MaxTokensExceeded) else "context_length"
            self.metrics.cap_rejections.labels(req.model, reason).inc()
            raise
        if decision.clamped_from is not None:
            self.metrics.cap_clamps.labels(req.model, decision.reason or "").inc()
            ctx.headers.append((CLAMP_HEADER, str(decision.clamped_from).encode()))
        set_max_tokens(req, decision.max_tokens)
        body = upstream_body(req)
        if request_id is None:
            request_id = os.urandom(12).hex()
        ctx.headers.append((b"x-request-id", request_id.encode("latin-1")))
        ctx.request_id = request_id
        first = await self._dispatch(pool, req, body, request_id, ctx, rec)
        worker = ctx.worker
        assert worker is not None and ctx.resp is not None
        ctx.headers.append((b"x-tokengate-worker", worker.name.encode()))
        if req.stream:
            await self._stream(req, first, ctx, rec, send)
        elif req.upstream_stream:
            await self._collect(req, first, ctx, rec, send)
        else:
            await self._unary(req, ctx, rec, send)

    def _regions(self, region: str | None, workers: tuple[Worker, ...]) -> list[str]:
        chosen = region or self.default_region
        if chosen not in self.configured_regions and not any(w.region == chosen for w in workers):
            raise InvalidRequest(f"unknown region '{chosen[:64]}'", param="x-tokengate-region", code="unknown_region")
        return [chosen, *self.fallback_regions.get(chosen, ())]

    def _enter(self, worker: Worker, ctx: _Ctx, rec: RequestRecord) -> None:
        self._leave(ctx)
        worker.in_flight += 1
        ctx.worker = worker
        rec.worker, rec.region, rec.preset = worker.name, worker.region, worker.preset
        ctx.gauge = self.metrics.worker_in_flight(rec.model, worker.region, worker.preset, worker.name)
        ctx.gauge.inc()

    async def _dispatch(self, pool: tuple[Worker, ...], req: ParsedRequest, body: bytes, request_id: str,
                        ctx: _Ctx, rec: RequestRecord) -> bytes | None:
        """Send to the least-loaded worker; before the first byte, a refused or dead worker is retried on another
        of the same pool. Returns the first body chunk (streams), with ctx.resp set."""
        s = self.settings
        tried: list[Worker] = []
        last: GatewayError | None = None
        path = _PATHS[req.route]
        affinity = self._affinity(req) if s.prefix_affinity_bytes else None
        for _ in range(s.retry_attempts):
            self._turn += 1
            worker = pick(pool, monotonic(), self._turn, tried, affinity)
            if worker is None:
                break
            tried.append(worker)
            self._enter(worker, ctx, rec)
            headers = [("content-type", "application/json"), ("x-request-id", request_id)]
            if worker.api_key:
                headers.append(("authorization", f"Bearer {worker.api_key}"))
            try:
                rec.dispatched = perf_counter()
                resp = await self.pool.request(worker.origin, "POST", path, body, headers=headers,
                                               timeout=s.read_timeout)
                ctx.resp = resp
                if resp.status != 200:
                    data = await resp.read(s.read_timeout, limit=1024 * 1024)
                    resp.release()
                    ctx.resp = None
                    raise UpstreamStatus(resp.status, data)
                first = await resp.next_chunk(s.read_timeout) if req.upstream_stream else None
                self.registry.record_success(worker)
                return first
            except UpstreamStatus as exc:
                self.metrics.upstream_errors.labels(worker.name, _error_kind(exc)).inc()
                if exc.passthrough_status not in _RETRIABLE_STATUS:
                    raise
                self.registry.record_failure(worker)
                last = exc
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(worker.name, _error_kind(exc)).inc()
                if ctx.resp is not None:
                    ctx.resp.abort()
                    ctx.resp = None
                self.registry.record_failure(worker)
                if isinstance(exc, UpstreamTimeout) and exc.error_code != "worker_connect_timeout":
                    raise  # the worker may still be working on it: don't send the same request twice
                last = exc
        if last is not None:
            raise last
        raise NoWorkerAvailable(f"no ready worker for '{req.model}'", retry_after=2)

    def _affinity(self, req: ParsedRequest) -> int:
        limit = self.settings.prefix_affinity_bytes
        if req.route == "chat":
            parts: list[str] = []
            size = 0
            for m in req.body["messages"]:
                content = m.get("content")
                if isinstance(content, str):
                    parts.append(content)
                    size += len(content)
                if size >= limit:
                    break
            return affinity_key("\x00".join(parts).encode("utf-8", "surrogatepass")[:limit])
        prompt = req.body["prompt"]
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else str(prompt[:limit])
        return affinity_key(str(prompt).encode("utf-8", "surrogatepass")[:limit])

    async def _stream(self, req: ParsedRequest, first: bytes | None, ctx: _Ctx, rec: RequestRecord, send: Any
                      ) -> None:
        resp = ctx.resp
        assert resp is not None
        ctx.parser = parser = SSEParser(req.include_usage)
        ctx.started = True
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + ctx.headers})
        if first is None:  # the worker's body ended before any byte
            first = b""
        err = await relay(resp, first, parser, send, idle_timeout=self.settings.stream_idle_timeout)
        ctx.done = True
        st = parser.state
        rec.first_token, rec.last_token = st.first_token, st.last_token
        usage = st.usage
        if usage is not None:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
        else:
            rec.completion_tokens = st.content_events
            rec.prompt_tokens = ctx.decision.prompt_tokens if ctx.decision else None
        if st.chunks:
            self.metrics.observe_relay(st.relay_seconds / st.chunks)
        if err is not None:
            rec.status = status_of(err)
            worker = ctx.worker
            self.metrics.upstream_errors.labels(worker.name if worker else "", _error_kind(err)).inc()
            resp.abort()
            ctx.resp = None
            if worker is not None:
                self._abort_on_worker(worker, req.route, ctx.request_id)
            return
        rec.status = 200
        ctx.resp = None
        await _finish(resp)

    async def _collect(self, req: ParsedRequest, first: bytes | None, ctx: _Ctx, rec: RequestRecord, send: Any
                       ) -> None:
        """A non-streaming client, a streaming worker: gather the stream into one response object."""
        resp = ctx.resp
        assert resp is not None
        agg = StreamAggregator(req.route)
        ctx.parser = parser = SSEParser(include_usage=True, sink=agg.add)
        st = parser.state
        chunk = first
        try:
            while chunk is not None:
                parser.feed(chunk, perf_counter())
                if st.saw_done:
                    break
                chunk = await resp.next_chunk(self.settings.stream_idle_timeout)
            if not st.saw_done:
                raise UpstreamProtocolError("worker ended the stream without [DONE]", code="worker_stream_truncated")
            data = orjson.dumps(agg.result())
        except GatewayError as exc:
            if not isinstance(exc, UpstreamStatus):
                worker = ctx.worker
                self.metrics.upstream_errors.labels(worker.name if worker else "", _error_kind(exc)).inc()
            raise
        rec.streamed = False
        rec.first_token, rec.last_token = st.first_token, st.last_token
        usage = st.usage or {}
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.completion_tokens = usage.get("completion_tokens", st.content_events)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   *ctx.headers]
        ctx.started = ctx.done = True
        rec.status = 200
        ctx.resp = None
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})
        await _finish(resp)

    async def _unary(self, req: ParsedRequest, ctx: _Ctx, rec: RequestRecord, send: Any) -> None:
        resp = ctx.resp
        assert resp is not None
        try:
            data = await resp.read(self.settings.read_timeout)
        except UpstreamError as exc:
            worker = ctx.worker
            self.metrics.upstream_errors.labels(worker.name if worker else "", _error_kind(exc)).inc()
            raise
        ctx.resp = None
        resp.release()
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("worker answered with invalid JSON") from None
        usage = doc.get("usage") if isinstance(doc, dict) else None
        if isinstance(usage, dict):
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   *ctx.headers]
        ctx.started = ctx.done = True
        rec.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    def _abort_on_worker(self, worker: Worker, route: Route, request_id: str) -> None:
        """Closing the connection is how vLLM learns a client left, but it sometimes misses it and generates to
        the end; where the worker has the explicit abort endpoint, say it outright too (fire and forget)."""
        if not worker.explicit_abort or not request_id:
            return
        prefix = "chatcmpl" if route == "chat" else "cmpl"
        body = orjson.dumps({"request_ids": [f"{prefix}-{request_id}", request_id]})
        task = asyncio.get_running_loop().create_task(self._post_abort(worker, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_abort(self, worker: Worker, body: bytes) -> None:
        headers = [("content-type", "application/json")]
        if worker.api_key:
            headers.append(("authorization", f"Bearer {worker.api_key}"))
        try:
            resp = await self.pool.request(worker.origin, "POST", "/inference/v1/abort_requests", body,
                                           headers=headers, timeout=2.0)
            await resp.read(2.0, limit=65536)
            resp.release()
        except GatewayError:
            return
        if resp.status in (403, 404, 405):  # not served (older vLLM, or started without --enable-scale-out)
            worker.explicit_abort = False

    async def _remote_count(self, pool: tuple[Worker, ...], payload: dict[str, Any]) -> int:
        self._turn += 1
        worker = pick(pool, monotonic(), self._turn)
        if worker is None:
            raise NoWorkerAvailable(f"no ready worker for '{payload.get('model')}'", retry_after=2)
        headers = [("content-type", "application/json")]
        if worker.api_key:
            headers.append(("authorization", f"Bearer {worker.api_key}"))
        resp = await self.pool.request(worker.origin, "POST", "/tokenize", orjson.dumps(payload), headers=headers,
                                       timeout=self.settings.read_timeout)
        try:
            data = await resp.read(self.settings.read_timeout, limit=64 * 1024 * 1024)
        finally:
            resp.release()
        if resp.status != 200:
            raise UpstreamStatus(resp.status, data)
        try:
            count = orjson.loads(data)["count"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamProtocolError("worker's /tokenize answer has no count") from None
        if not isinstance(count, int):
            raise UpstreamProtocolError("worker's /tokenize answer has no count")
        return count


async def _finish(resp: UpstreamResponse) -> None:
    """After [DONE] the worker still owes the chunked-encoding terminator; wait for it briefly so the connection
    can be reused (the client already has its whole answer)."""
    try:
        while await resp.next_chunk(1.0) is not None:
            pass
    except GatewayError:
        resp.abort()
        return
    resp.release()


def _read_headers(scope: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
    region = request_id = None
    length: int | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header", param=None) from None
        elif name == REGION_HEADER:
            region = value.decode("latin-1").strip() or None
        elif name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable():
                request_id = text
    return region, request_id, length


async def _read_body(receive: Any, length: int | None, limit: int) -> bytes:
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
