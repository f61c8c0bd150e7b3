"""Sending a request to a worker of its pool: the least-loaded one first, and before the first byte another one
when a worker refuses or fails — never the same request twice once a worker may be working on it.

It also keeps the count of requests in flight per worker (what ``routing.pick`` balances on) and the per-worker
in-flight gauge, and asks workers for a prompt count (``/tokenize``) with the same fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from time import monotonic, perf_counter
from typing import Any

from .errors import GatewayError, NoWorkerAvailable, UpstreamError, UpstreamStatus, UpstreamTimeout
from .exchange import Exchange, can_open_relay, error_kind, open_relay
from .metrics import GatewayMetrics, RequestRecord
from .protocol import ParsedRequest, Route
from .routing import affinity_for, pick
from .settings import Settings
from .streaming import RelayBatch
from .upstream import UpstreamPool, UpstreamProtocolError
from .worker_calls import WorkerCalls
from .workers.registry import Registry, Worker

_PATHS: dict[Route, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
_RETRIABLE_STATUS = (502, 503)
_UNREACHABLE = ("worker_unreachable", "worker_connect_timeout", "worker_disconnected")  # before any answer


def _after_send(exc: GatewayError) -> bool:
    """A timeout after the request reached the worker (not while connecting): it may still be working on it."""
    return isinstance(exc, UpstreamTimeout) and exc.error_code != "worker_connect_timeout"


def _check_event_stream(content_type: bytes | None) -> None:
    """A streamed request's 200 must be an event stream: an HTML page or a whole JSON answer from something that
    is not (or not quite) vLLM is a bad worker response, refused before anything reaches the client."""
    if content_type is not None and not content_type.lower().startswith(b"text/event-stream"):
        kind = content_type.decode("latin-1").split(";")[0].strip()[:64]
        raise UpstreamProtocolError(f"worker answered a streamed request with '{kind}', not an event stream")


class Dispatcher:
    def __init__(self, *, settings: Settings, registry: Registry, pool: UpstreamPool, metrics: GatewayMetrics,
                 calls: WorkerCalls) -> None:
        self.settings = settings
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.calls = calls
        self._turn = 0  # ties between the least-loaded workers, taken in turn by requests
        self._own_turn = 0  # and, apart (or they would skip workers in step), by the gateway's own calls
        self._batch: RelayBatch | None = None

    def relay_batch(self) -> RelayBatch:
        """The running loop's ``RelayBatch`` (one per loop: a test may run several, one after the other)."""
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or batch.loop is not loop:
            batch = self._batch = RelayBatch(loop)
        return batch

    def enter(self, worker: Worker, ctx: Exchange, rec: RequestRecord) -> None:
        """``ctx`` is now in flight on ``worker`` (leaving the worker it was on, if any)."""
        self.leave(ctx)
        worker.in_flight += 1
        ctx.worker = worker
        rec.worker, rec.region, rec.preset = worker.name, worker.region, worker.preset
        ctx.gauge = self.metrics.worker_in_flight(rec.model, worker.region, worker.preset, worker.name)
        ctx.gauge.inc()

    def leave(self, ctx: Exchange) -> None:
        worker = ctx.worker
        if worker is not None:
            worker.in_flight -= 1
            ctx.gauge.dec()
            ctx.worker = ctx.gauge = None

    async def send(self, pool: tuple[Worker, ...], req: ParsedRequest, body: bytes, request_id: str,
                        ctx: Exchange, rec: RequestRecord) -> bytes | None:
        """Send to the least-loaded worker; before the first byte, a refused or dead worker is retried on another
        of the same pool. Returns the first body chunk (streams; None when the relay took the stream on before
        it: ctx.relay), with ctx.resp set."""
        s = self.settings
        early = can_open_relay(req, ctx)
        tried: list[Worker] = []
        last: GatewayError | None = None
        path = _PATHS[req.route]
        affinity = affinity_for(req, s.prefix_affinity_bytes) if s.prefix_affinity_bytes else None
        for _ in range(s.retry_attempts):
            self._turn += 1
            worker = pick(pool, monotonic(), self._turn, tried, affinity)
            if worker is None:
                break
            tried.append(worker)
            self.enter(worker, ctx, rec)
            headers = [("content-type", "application/json"), ("x-request-id", request_id)]
            if worker.api_key:
                headers.append(("authorization", f"Bearer {worker.api_key}"))
            try:
                rec.dispatched = perf_counter()
                ctx.awaiting_head = True
                resp = await self.pool.request(worker.origin, "POST", path, body, headers=headers,
                                               timeout=s.read_timeout)
                ctx.awaiting_head = False
                ctx.reached = True
                ctx.resp = resp
                if resp.status != 200:
                    data = await resp.read(s.read_timeout, limit=1024 * 1024)
                    resp.release()
                    ctx.resp = None
                    raise UpstreamStatus(resp.status, data, resp.header(b"retry-after"))
                if req.upstream_stream:
                    _check_event_stream(resp.header(b"content-type"))
                first = None
                if early:
                    await open_relay(req, ctx, worker, first_timeout=s.read_timeout,
                                     idle_timeout=s.stream_idle_timeout, batch=self.relay_batch())
                elif req.upstream_stream:
                    first = await resp.next_chunk(s.read_timeout)
                self.registry.record_success(worker)
                return first
            except (UpstreamStatus, UpstreamError) as exc:
                if ctx.resp is not None:
                    ctx.resp.abort()
                    ctx.resp = None
                # still running there only when the wait for its answer timed out (abort it on the way out)
                ctx.awaiting_head = _after_send(exc)
                ctx.reached = ctx.reached or ctx.awaiting_head
                self.worker_failed(worker, exc, generating=not req.upstream_stream)
                last = exc
        if last is not None:
            raise last
        raise NoWorkerAvailable(f"no ready worker for '{req.model}'", retry_after=2)

    def worker_failed(self, worker: Worker, exc: UpstreamStatus | UpstreamError, *, generating: bool = False
                       ) -> None:
        """A worker failed before the first byte: count it against the worker, and raise when no other worker may
        be tried — the worker's own refusal of this request, or a timeout after the request was sent (the worker
        may still be working on it: never send the same request twice). With ``generating`` (an unstreamed
        answer, whose head comes only at its end) a timeout is a long generation, not a failing worker."""
        self.metrics.upstream_errors.labels(worker.region, worker.preset, worker.name, error_kind(exc)).inc()
        if isinstance(exc, UpstreamStatus) and exc.passthrough_status not in _RETRIABLE_STATUS:
            raise exc
        sent = _after_send(exc)
        if not (sent and generating):
            self.registry.record_failure(worker)
        if sent:
            raise exc

    def _in_turn(self, pool: tuple[Worker, ...]) -> Iterator[Worker]:
        """The pool's workers in the order a retry takes them (the least loaded first, each once, at most
        ``retry_attempts``): for the gateway's own calls; ``send`` keeps its loop (the hot path)."""
        tried: list[Worker] = []
        for _ in range(self.settings.retry_attempts):
            self._own_turn += 1
            worker = pick(pool, monotonic(), self._own_turn, tried)
            if worker is None:
                return
            tried.append(worker)
            yield worker

    async def tokenize(self, pool: tuple[Worker, ...], body: bytes) -> tuple[int, bytes, bytes | None]:
        """A worker's ``/tokenize`` answer (``POST /tokenize`` passed through): another worker of the pool when one
        can't be reached or answers 502/503. Only that counts against a worker: an answer too large or too slow
        for the gateway is the request's doing (the client chose the body), and is not tried elsewhere."""
        last: GatewayError | None = None
        for worker in self._in_turn(pool):
            try:
                status, data, retry_after = await self.calls.tokenize(worker, body)
            except UpstreamError as exc:
                if exc.error_code not in _UNREACHABLE:
                    raise
                self.worker_failed(worker, exc)
                last = exc
                continue
            if status in _RETRIABLE_STATUS:
                last = UpstreamStatus(status, data, retry_after)
                self.worker_failed(worker, last)
                continue
            # (no record_success: /tokenize is answered by vLLM's API server, also while its engine hangs, so it
            # must not clear the failures of the generations timing out there — only a generation's first byte does)
            return status, data, retry_after
        if last is not None:
            raise last
        raise NoWorkerAvailable("no ready worker to count with", retry_after=2)

    async def remote_count(self, pool: tuple[Worker, ...], payload: dict[str, Any]) -> int:
        """A worker's own prompt count; a worker that can't be reached is skipped (and counted against), like a
        dispatch before its first byte."""
        last: GatewayError | None = None
        for worker in self._in_turn(pool):
            try:
                return await self.calls.count_tokens(worker, payload)
            except (UpstreamStatus, UpstreamError) as exc:
                self.worker_failed(worker, exc)
                last = exc
        if last is not None:
            raise last
        raise NoWorkerAvailable(f"no ready worker for '{payload.get('model')}'", retry_after=2)
