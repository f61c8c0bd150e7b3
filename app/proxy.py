"""The generation routes as one pure-ASGI endpoint: parse → caps → route → upstream → relay → metrics.

Pure ASGI on purpose (no BaseHTTPMiddleware, no Request/Response objects): this path runs for every request and
every streamed chunk.  Errors raised before the first byte become an HTTP error response; after it, the relay
speaks in-band.  A client that goes away cancels the handler wherever it waits, and the upstream request is
aborted by closing its connection, which vLLM turns into an engine abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from time import perf_counter
from typing import Any

from .admission import PoolGates
from .auth import KeyStore, check_access
from .busypoll import BusyPoll
from .caps import CapConfig, Caps, decide
from .clientwriter import CLIENT_WRITER
from .cors import EXTRA_HEADERS
from .counting import PromptCounter
from .dispatch import Dispatcher
from .errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    MaxTokensExceeded,
    ModelNotFound,
    NoWorkerAvailable,
    UpstreamError,
    render,
    sse_event,
    status_of,
)
from .exchange import (
    WORKER_HEADER,
    Exchange,
    answer_collected,
    answer_stream,
    answer_unary,
    record_tokens,
)
from .limits import Limiter, MemoryLimiter
from .metrics import UNKNOWN, GatewayMetrics, RequestRecord
from .policy import RequestPolicy, check_min_tokens
from .policy import check as check_policy
from .protocol import ROUTES, Route, named_model, parse_request, set_max_tokens, upstream_body
from .requestio import ClientGone, read_body, read_headers
from .routing import candidates, placement_names, placements, pool_labels
from .settings import Settings
from .tokenizer import TokenizerStore
from .upstream import UpstreamPool
from .watchdog import WriteWatchdog
from .worker_calls import WorkerCalls
from .workers.registry import ModelInfo, Registry, Snapshot, Worker

log = logging.getLogger("tokengate.proxy")


async def _tell(ctx: Exchange, send: Any, exc: GatewayError) -> None:
    """An error the client has not heard of, if it has heard nothing final yet: in-band once the response has
    begun, else as the response. Best effort: the client may be gone."""
    if ctx.done:
        return
    ctx.done = True
    with contextlib.suppress(Exception):
        if ctx.begun():
            await send({"type": "http.response.body", "body": sse_event(exc), "more_body": False})
        else:
            status, headers, body = render(exc)
            await send({"type": "http.response.start", "status": status, "headers": headers + ctx.headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})


def _starting(model: str, snapshot: Snapshot) -> bool:
    """A worker lists ``model`` (or will, once started) but none serves it yet."""
    return any(model in w.models or model in w.expected_models for w in snapshot.workers)
CLAMP_HEADER = b"x-tokengate-max-tokens-clamped"


class Proxy:
    def __init__(self, *, settings: Settings, registry: Registry, pool: UpstreamPool, metrics: GatewayMetrics,
                 tokenizers: TokenizerStore, counter: PromptCounter, default_caps: CapConfig,
                 preset_caps: dict[str, CapConfig] | None = None, regions: set[str] | None = None,
                 keys: KeyStore | None = None, limiter: Limiter | None = None,
                 policy: RequestPolicy | None = None, busy_poll: BusyPoll | None = None) -> None:
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
        self.keys = keys or KeyStore.open()
        self.limiter: Limiter = limiter or MemoryLimiter()
        self.policy = policy or RequestPolicy()
        self.gates = PoolGates(per_worker=settings.worker_concurrency, queue_size=settings.queue_size,
                               queue_timeout=settings.queue_timeout, processes=settings.workers,
                               depth=lambda model, region: metrics.queue_depth.labels(model, region).set)
        self.calls = WorkerCalls(pool, timeout=settings.read_timeout)
        self.dispatcher = Dispatcher(settings=settings, registry=registry, pool=pool, metrics=metrics,
                                     calls=self.calls)
        self._caps: dict[tuple[str, int, tuple[str, ...]], Caps] = {}
        self.draining = False
        self.watchdog = WriteWatchdog(settings.write_timeout, metrics.write_stalls)
        self.busy_poll = busy_poll  # polls instead of sleeping while requests are in flight (--busy-poll)

    # ASGI entry point for both generation routes
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.handle(ROUTES[scope["path"]], scope, receive, send)

    def caps_for(self, model: str, info: ModelInfo, presets: tuple[str, ...], *, series: bool = True) -> Caps:
        """The caps of ``model`` on workers of these ``region/preset`` placements (``routing.placements``), memoized
        with the pool's cap counters created at 0; ``series=False`` (a look-up for ``/v1/models``) does neither."""
        key = (model, info.max_model_len, presets)
        caps = self._caps.get(key)
        if caps is None:
            configs = [self.preset_caps.get(p, self.default_caps) for p in presets] or [self.default_caps]

            caps = configs[0].build(info.max_model_len)
            for cfg in configs[1:]:
                caps = caps.tighten(cfg.build(info.max_model_len))
            if not series:
                return caps  # not memoized, so the pool's first request still creates its counters
            self._caps[key] = caps
            # the cap counters exist from 0 as soon as the pool does: rate() over a series that first appears
            # mid-window extrapolates oddly (a clamp ratio of 0.32 for 6 clamps in 24 requests)
            region, preset = pool_labels(presets)
            for reason in ("max_tokens_cap", "context_cap"):
                self.metrics.cap_clamps.labels(model, region, preset, reason)
            for reason in ("max_tokens_cap", "context_length"):
                self.metrics.cap_rejections.labels(model, region, preset, reason)
        return caps

    async def handle(self, route: Route, scope: dict[str, Any], receive: Any, send: Any) -> None:
        arrival = perf_counter()
        if self.busy_poll is not None:
            self.busy_poll.wake()
        ctx = Exchange(asyncio.current_task())
        extra = scope.get(EXTRA_HEADERS)
        if extra is not None:  # (cors.py: an allowed page's request)
            ctx.headers.extend(extra)
        extensions = scope.get("extensions")
        if extensions:
            ctx.client = extensions.get(CLIENT_WRITER)
        self.watchdog.track(ctx)
        rec = RequestRecord(route, UNKNOWN, "", "", "", 0, arrival, arrival)
        watcher: asyncio.Task[None] | None = None
        try:
            region, request_id, length, authorization = read_headers(scope)
            ctx.principal = self.keys.authenticate(authorization)
            try:
                raw = await read_body(receive, length, self.settings.max_body_bytes, self.settings.body_timeout)
            except ClientGone:
                ctx.client_gone = True
                self._client_gone(route, ctx, rec)
                return
            if ctx.client is None:
                watcher = asyncio.get_running_loop().create_task(ctx.watch_receive(receive))
            elif not ctx.client.watch(ctx.client_lost):
                ctx.client_gone = True
                self._client_gone(route, ctx, rec)
                return
            await self._serve(route, raw, region, request_id, ctx, rec, send)
        except asyncio.CancelledError:
            if not ctx.client_gone or ctx.task is None:
                # the server is stopping (drain deadline passed): say so, in-band once streaming, rather than
                # truncate or leave it to uvicorn's plain-text 500
                rec.status = 503
                await _tell(ctx, send, NoWorkerAvailable("the gateway is shutting down", code="gateway_shutdown"))
                if ctx.task is None:
                    raise
                # answered: end as a request that was refused, not as an exception uvicorn logs with a traceback
                # (uvicorn, which cancelled it at its shutdown deadline, does not wait for it)
                ctx.task.uncancel()
                return
            ctx.task.uncancel()
            self._client_gone(route, ctx, rec)
        except GatewayError as exc:
            rec.status = status_of(exc)
            if not ctx.begun():
                status, headers, body = render(exc)
                ctx.done = True
                extra = ctx.headers
                if ctx.ticket is not None and not ctx.sent_to_worker:  # given back (_settle): the count before is
                    extra = [h for h in extra if not h[0].startswith(b"x-ratelimit-")]  # stale
                await send({"type": "http.response.start", "status": status, "headers": headers + extra})
                await send({"type": "http.response.body", "body": body, "more_body": False})
        except Exception:  # a bug: say so in OpenAI's shape (in-band once streaming), never a bare 500 or a hang
            log.exception("unhandled error on %s", scope.get("path"))
            rec.status = 500
            await _tell(ctx, send, GatewayError("internal error in the gateway"))
        finally:
            ctx.done = True
            ctx.relay = None
            self.watchdog.untrack(ctx)
            if watcher is not None:
                watcher.cancel()
            if ctx.resp is not None:
                ctx.resp.abort()
            if ctx.worker is not None and (ctx.resp is not None or ctx.awaiting_head):
                # unfinished on the worker: a non-streaming (unary) answer's head only comes with its end
                self.calls.abort(ctx.worker, route, ctx.request_id)
            self.dispatcher.leave(ctx)
            if ctx.slot is not None:
                ctx.slot.release()
            rec.end = perf_counter()
            try:
                self.metrics.observe_request(rec)
            except Exception:  # a bug of ours must not keep the key's slot and budget too
                log.exception("metrics of a request on %s", scope.get("path"))
            if ctx.ticket is not None:
                await self._settle(ctx, rec)

    async def _settle(self, ctx: Exchange, rec: RequestRecord) -> None:
        """Charge the key what the request really cost: the usage, or what was streamed before a disconnect."""
        assert ctx.ticket is not None
        prompt = rec.prompt_tokens
        if prompt is None and ctx.decision is not None:
            prompt = ctx.decision.prompt_tokens
        used = (prompt or 0) + (rec.completion_tokens or 0)
        unsent = not ctx.sent_to_worker
        if unsent or (rec.status >= 400 and rec.status != 499 and not rec.completion_tokens):
            used = 0  # refused, failed before any work, or given up while queued: charge nothing
        # one that never reached a worker (the admission queue was full, or timed out) is not one of the key's
        # requests per minute either: the gateway's overload must not use up its clients' budgets
        await self.limiter.settle(ctx.ticket, used, unsent=unsent)

    def _client_gone(self, route: Route, ctx: Exchange, rec: RequestRecord) -> None:
        rec.status = 499
        rec.streamed = ctx.stream
        if ctx.parser is not None:
            record_tokens(rec, ctx.parser.state, ctx.decision)
        elif ctx.decision is not None:
            rec.prompt_tokens = ctx.decision.prompt_tokens
        if ctx.worker is None and ctx.resp is None:
            phase = "before_dispatch"
        elif not ctx.stream:
            phase = "non_stream"
        else:
            phase = "streaming" if rec.first_token is not None else "before_first_token"
        self.metrics.client_disconnects.labels(route, rec.model, rec.region, rec.preset, phase).inc()

    @staticmethod
    def _label_outage(rec: RequestRecord, model: str, region: str, snapshot: Snapshot) -> None:
        """A request no worker could take: labelled with its region and the presets there of the model's workers
        (down or starting), so that per-preset error ratios see the outage."""
        rec.region = region
        down = [w for w in snapshot.workers if w.region == region and (model in w.models or model in w.expected_models)]
        if down:
            rec.preset = pool_labels(placement_names(down))[1]

    async def _serve(self, route: Route, raw: bytes, region: str | None, request_id: str | None, ctx: Exchange,
                     rec: RequestRecord, send: Any) -> None:
        snapshot = self.registry.snapshot
        try:
            req = parse_request(route, raw)
        except InvalidRequest:
            named = named_model(raw)  # a served model's requests are counted as its own, invalid ones too
            if named is not None and named in snapshot.models:
                rec.model = named
            raise
        ctx.stream = req.stream
        if not req.stream and self.settings.non_stream_upstream == "unary":
            req.upstream_stream = False  # the worker's own JSON answer, passed through (answer_unary)
        if req.model in snapshot.models or _starting(req.model, snapshot):
            rec.model = req.model
        check_policy(req, self.policy)
        try:
            info = self.model_info(req.model, snapshot)
        except NoWorkerAvailable:  # its workers are all starting or down, or the gateway is draining
            if not self.draining:
                with contextlib.suppress(InvalidRequest):  # a region that does not exist is no label
                    self._label_outage(rec, req.model, self.regions_for(region, snapshot.workers)[0], snapshot)
            raise
        regions = self.regions_for(region, snapshot.workers)
        rec.region = regions[0]
        check_access(ctx.principal, req.model, regions[0])
        regions = [r for r in regions if ctx.principal.allows_region(r)]  # fallbacks the key may not use
        pool = candidates(snapshot, req.model, regions)
        if not pool:
            self._label_outage(rec, req.model, regions[0], snapshot)
            raise NoWorkerAvailable(
                f"no ready worker serves '{req.model}' in region '{regions[0]}'", retry_after=5,
                code="no_worker_in_region",
            )
        names = placements(snapshot, pool)
        caps = ctx.principal.caps.apply(self.caps_for(req.model, info, names))
        size = self.counter.size(req, self.tokenizers.get(req.model), lambda p: self.dispatcher.remote_count(pool, p),
                                 max_model_len=caps.model_max_len)
        try:
            ctx.decision = decision = await decide(
                caps, req.max_tokens, req.max_tokens_param, size,
                prompt_param="messages" if route == "chat" else "prompt", model=req.model,
            )
        except (MaxTokensExceeded, ContextLengthExceeded) as exc:
            reason = "max_tokens_cap" if isinstance(exc, MaxTokensExceeded) else "context_length"
            self.metrics.cap_rejections.labels(req.model, *pool_labels(names), reason).inc()
            raise
        if decision.clamped_from is not None:
            rec.clamp = (*pool_labels(names), decision.reason or "")
            ctx.headers.append((CLAMP_HEADER, str(decision.clamped_from).encode()))
        set_max_tokens(req, decision.max_tokens)
        check_min_tokens(req, decision.max_tokens)
        prompt_estimate = decision.prompt_tokens
        if prompt_estimate is None:
            # the bound that spared the count (bytes: ~4x the tokens of English) is no charge for a token budget:
            # a key with one pays its exact count (it was refused as "too large" for a prompt that fits)
            prompt_estimate = await size.exact() if ctx.principal.limits.tpm is not None else (size.bound or 0)
        batch = req.batch  # a completions batch: n answers for each prompt, and each prompt (exact for a token budget)
        prompts = prompt_estimate * batch
        if batch > 1 and size.each is not None and ctx.principal.limits.tpm is not None:
            prompts = sum(await size.each())
        ctx.ticket = await self.limiter.admit(ctx.principal, prompts + decision.max_tokens * req.n * batch)
        gate = self.gates.get(req.model, regions[0], len(pool))
        queue_time = self.metrics.queue_timer(req.model, regions[0])
        try:
            ctx.slot = await gate.acquire(ctx.principal.priority)
        except GatewayError as exc:
            self.metrics.admission_rejections.labels(req.model, regions[0], str(exc.error_code or "")).inc()
            if exc.error_code == "queue_timeout":
                queue_time.observe(self.settings.queue_timeout)
            raise
        queue_time.observe(ctx.slot.queued)
        ctx.headers.extend(ctx.ticket.headers())  # (not on an admission refusal: that gives the key's place back)
        body = upstream_body(req)
        # the worker's id for it is always this request's own: a client's X-Request-Id (echoed back to it) may be
        # reused — a retry, or another client's — and vLLM would take two requests with one id for one, aborts too
        worker_id = os.urandom(12).hex() if request_id is None else f"{request_id}-{os.urandom(4).hex()}"
        ctx.headers.append((b"x-request-id", (request_id or worker_id).encode("latin-1")))
        ctx.request_id = worker_id
        first = await self.dispatcher.send(pool, req, body, worker_id, ctx, rec)
        worker = ctx.worker
        assert worker is not None and ctx.resp is not None
        ctx.headers.append((WORKER_HEADER, worker.name.encode()))
        s = self.settings
        if req.stream:
            err = await answer_stream(req, first, ctx, rec, send, metrics=self.metrics,
                                      idle_timeout=s.stream_idle_timeout)
            if err is not None:
                self.calls.abort(worker, req.route, ctx.request_id)
        elif req.upstream_stream:
            await answer_collected(req, first, ctx, rec, send, metrics=self.metrics,
                                   idle_timeout=s.stream_idle_timeout)
        else:
            await answer_unary(ctx, rec, send, metrics=self.metrics, read_timeout=s.read_timeout)

    def model_info(self, model: str, snapshot: Snapshot) -> ModelInfo:
        """The model's info, or the error a request for it gets: 503 while its workers start (or the gateway
        drains), 502 when workers that never listed their models can't be reached, else 404."""
        info = snapshot.models.get(model)
        if info is None:
            if _starting(model, snapshot):
                raise NoWorkerAvailable(f"no worker serving '{model}' is ready yet", retry_after=5)
            unlisted = [w for w in snapshot.workers if not w.models and not w.expected_models]
            if unlisted:  # workers that never listed their models: it may be theirs, so no 404
                if all(w.reason.startswith("unreachable") for w in unlisted):
                    raise UpstreamError(f"no worker that could serve '{model}' can be reached")
                raise NoWorkerAvailable(f"no worker serving '{model}' is ready yet", retry_after=5)
            raise ModelNotFound(f"The model `{model[:256]}` does not exist.", param="model")
        if self.draining:
            raise NoWorkerAvailable("the gateway is shutting down", retry_after=5)
        return info

    def close_admission(self) -> None:
        self.gates.close()

    def regions_for(self, region: str | None, workers: tuple[Worker, ...]) -> list[str]:
        """The request's region (its header, else the default) and then its fallbacks."""
        chosen = region or self.default_region
        if chosen not in self.configured_regions and not any(w.region == chosen for w in workers):
            raise InvalidRequest(f"unknown region '{chosen[:64]}'", param="x-tokengate-region", code="unknown_region")
        return [chosen, *self.fallback_regions.get(chosen, ())]
