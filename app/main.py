"""create_app(settings): lifespan, routes, error handlers. No logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from . import __version__, multiproc, tokenize_route
from .api import router
from .asgi import GatewayApp
from .auth import KeyStore, load_keys
from .busypoll import BusyPoll
from .caps import BUILTIN_CAPS, CapConfig
from .cors import Cors
from .counting import PromptCounter
from .drain import drain_on_sigterm
from .errors import GatewayError, InvalidRequest, render
from .limits import Limiter, MemoryLimiter
from .limits_redis import RedisLimiter
from .metrics import GatewayMetrics
from .openapi import document_generation_routes
from .policy import RequestPolicy
from .protocol import ROUTES
from .proxy import Proxy
from .settings import Settings
from .state import AppState
from .status import StatusSampler, status_router
from .tokenizer import TokenizerStore
from .upstream import UpstreamPool
from .worker_metrics import router as worker_metrics_router
from .workers.health import HealthChecker
from .workers.registry import Registry, Worker
from .workers.supervisor import Supervisor, WorkerSpec

log = logging.getLogger("tokengate")


def external_workers(settings: Settings) -> list[Worker]:
    workers: list[Worker] = []
    for i, spec in enumerate(settings.upstreams()):
        name = spec.url.split("://", 1)[-1]
        if any(w.name == name for w in workers):
            name = f"{name}#{i}"
        workers.append(Worker(name=name, url=spec.url, region=spec.region or settings.default_region,
                              preset=spec.preset or "external", api_key=settings.upstream_api_key))
    return workers


def explicit_caps(settings: Settings) -> CapConfig:
    return CapConfig(settings.max_tokens_cap, settings.default_max_tokens, settings.context_cap, settings.cap_policy)


def create_app(settings: Settings, *, worker_specs: Sequence[WorkerSpec] = (),
               preset_caps: Mapping[str, CapConfig] | None = None, regions: Iterable[str] = (),
               prom_registry: CollectorRegistry | None = None,
               on_ready: Callable[[AppState], None] | None = None) -> FastAPI:
    """Build the gateway. External workers come from ``settings.upstream``; managed ones from ``worker_specs``
    (launched and supervised by the lifespan). ``preset_caps`` maps "region/preset" to that preset's caps;
    flags and env (in ``settings``) override them."""
    explicit = explicit_caps(settings)
    caps_by_preset = {key: explicit.resolve(cfg, BUILTIN_CAPS) for key, cfg in (preset_caps or {}).items()}
    prom = prom_registry if prom_registry is not None else CollectorRegistry()
    metrics = GatewayMetrics(prom, version=__version__)
    registry = Registry()
    pool = UpstreamPool(connect_timeout=settings.connect_timeout, write_batch=settings.write_batch)
    tokenizers = TokenizerStore(settings.tokenizer_paths())
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokengate-count")
    keys = load_keys(settings.keys_file) if settings.keys_file is not None else KeyStore.open()
    if keys.is_open:
        log.warning("OPEN MODE: no API keys configured (--keys FILE); anyone who can reach this port can use it")
    limiter: Limiter = (RedisLimiter.from_url(settings.redis_url, fail_open=settings.redis_fail_open)
                        if settings.redis_url else MemoryLimiter())
    policy = RequestPolicy(max_n=settings.max_n, max_logprobs=settings.max_logprobs,
                           allow_fields=frozenset(settings.allow_fields),
                           allow_unknown_fields=settings.allow_unknown_fields,
                           allow_remote_media=settings.allow_remote_media)
    busy_poll = BusyPoll(settings.busy_poll, lambda: sum(w.in_flight for w in registry.workers()),
                         metrics.busy_poll.inc) if settings.busy_poll > 0 else None
    proxy = Proxy(settings=settings, registry=registry, pool=pool, metrics=metrics, tokenizers=tokenizers,
                  keys=keys, limiter=limiter, policy=policy, busy_poll=busy_poll,
                  counter=PromptCounter(executor, offloop_bytes=settings.tokenize_offloop_bytes),
                  default_caps=explicit.resolve(BUILTIN_CAPS), preset_caps=caps_by_preset,
                  regions={*regions, *(s.region for s in worker_specs),
                           *(u.region for u in settings.upstreams() if u.region)})
    health = HealthChecker(registry, pool, metrics, tokenizers, interval=settings.discovery_interval)
    supervisor = Supervisor(worker_specs, registry, metrics, on_start=health.poke) if worker_specs else None
    state = AppState(settings, registry, pool, prom, metrics, tokenizers, proxy, health, supervisor,
                     started_at=int(time.time()))
    sampler = StatusSampler(prom, shared_dir=multiproc.shared_dir(settings.workers))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(limiter, RedisLimiter):
            try:
                await limiter.ping()  # fail at start, before any worker is launched, not on the first request
            except GatewayError as exc:
                if not limiter.fail_open:
                    raise
                log.warning("%s (%s); starting anyway (--redis-fail-open): requests are admitted without their keys' "
                            "limits until it answers", exc, exc.__cause__)
        for worker in external_workers(settings):
            registry.add(worker)
        if supervisor is not None:
            await supervisor.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(health.check_all(), timeout=settings.connect_timeout + 1)
        health_task = asyncio.create_task(health.run(), name="tokengate-health")
        sampler_task = asyncio.create_task(sampler.run(), name="tokengate-status")
        ready_task = asyncio.create_task(_announce(state, on_ready), name="tokengate-ready") if on_ready else None
        if settings.workers > 1 and not drain_on_sigterm(state, asyncio.get_running_loop()):
            # one of --workers N, whose first SIGTERM should drain as a single process's does
            log.warning("no uvicorn signal handler to wrap: this process will not drain on SIGTERM")
        if settings.workers > 1 and not settings.redis_url and not keys.is_open:
            log.warning("--workers %d without --redis: each gateway process enforces the per-key limits on its own "
                        "(a key gets up to %d times its rpm/tpm/concurrency)", settings.workers, settings.workers)
        if settings.gc_freeze:
            # everything loaded so far (tokenizers, templates, pydantic models) lives as long as the process: keep
            # it out of the collector's full passes, which otherwise stall the loop for tens of ms under load
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            proxy.draining = True
            proxy.close_admission()
            proxy.watchdog.stop()
            if busy_poll is not None:
                busy_poll.stop()
            for task in (health_task, sampler_task, ready_task):
                if task is not None:
                    task.cancel()
            if supervisor is not None:
                await supervisor.stop()
            await pool.close()
            await limiter.aclose()
            executor.shutdown(wait=False, cancel_futures=True)
            if settings.workers > 1 and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # live gauges go

    app = GatewayApp(title="tokengate", version=__version__, lifespan=lifespan, redirect_slashes=False,
                     docs_url="/docs", redoc_url=None)
    app.state.tokengate = state
    app.include_router(router)
    app.include_router(status_router(sampler))
    app.include_router(worker_metrics_router)
    # the hot path: pure ASGI, taken before FastAPI's middlewares and router (asgi.py); the routes stay in the
    # router too, for a method other than POST (405) and the OpenAPI document
    tokenize = tokenize_route.Tokenize(proxy)
    app.fast_routes = {**dict.fromkeys(ROUTES, proxy), tokenize_route.PATH: tokenize}
    app.cors = Cors(settings.cors_origins) if settings.cors_origins else None
    app.router.routes.insert(0, Route("/v1/chat/completions", proxy, methods=["POST"]))
    app.router.routes.insert(1, Route("/v1/completions", proxy, methods=["POST"]))
    app.router.routes.insert(2, Route(tokenize_route.PATH, tokenize, methods=["POST"]))
    document_generation_routes(app, policy)
    _install_error_handlers(app)
    return app


SETTINGS_ENV = "TOKENGATE_SETTINGS_JSON"


def app_from_env() -> FastAPI:
    """One gateway process of ``tokengate serve --workers N``: the settings the parent resolved, from the
    environment (uvicorn's multiprocess supervisor starts each process with this factory)."""
    from .deployment import preset_caps
    from .httpserver import configure_protocol
    from .presets import builtin_presets_dir, load_catalog

    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_protocol(settings)
    catalog = load_catalog([builtin_presets_dir(), *settings.presets])
    return create_app(settings, preset_caps=preset_caps(catalog), regions=set(catalog.regions))


async def _announce(state: AppState, on_ready: Callable[[AppState], None] | None) -> None:
    while not any(w.ready for w in state.registry.workers()):
        await asyncio.sleep(0.25)
    if on_ready is not None:
        on_ready(state)


def _error_response(exc: GatewayError) -> JSONResponse:
    status, headers, body = render(exc)
    response = JSONResponse(content=None, status_code=status)
    response.body = body
    response.raw_headers = headers
    return response


def _install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return _error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        return _error_response(InvalidRequest(first.get("msg", "invalid request"), param=".".join(loc) or None))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        payload = {"error": {"message": str(exc.detail), "type": type_, "param": None, "code": code}}
        headers = dict(exc.headers or {})
        allow = headers.get("Allow") or headers.get("allow")
        if allow is not None and "GET" in allow.split(", ") and "HEAD" not in allow:
            headers.pop("allow", None)
            headers["Allow"] = allow + ", HEAD"  # answered as GET without the body (asgi.GatewayApp)
        return JSONResponse(payload, status_code=exc.status_code, headers=headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(GatewayError("internal error in the gateway"))

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
