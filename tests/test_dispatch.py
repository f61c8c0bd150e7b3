"""app/dispatch.py: in-flight accounting per worker, and which failures before the first byte may be retried on
another worker (the end-to-end retries run in tests/test_proxy.py against fake workers)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from app.dispatch import Dispatcher
from app.errors import UpstreamError, UpstreamStatus, UpstreamTimeout
from app.exchange import Exchange
from app.metrics import GatewayMetrics, RequestRecord
from app.settings import Settings
from app.upstream import UpstreamPool
from app.worker_calls import WorkerCalls
from app.workers.registry import Registry, Worker
from bench.fakeworker import ThreadedFakeWorker


def _dispatcher() -> tuple[Dispatcher, GatewayMetrics, Registry]:
    pool = UpstreamPool()
    metrics = GatewayMetrics(CollectorRegistry())
    registry = Registry(eject_after=3)
    settings = Settings(upstream=["http://127.0.0.1:9"])
    return (Dispatcher(settings=settings, registry=registry, pool=pool, metrics=metrics,
                       calls=WorkerCalls(pool, timeout=1.0)), metrics, registry)


def _errors(metrics: GatewayMetrics, worker: str, kind: str) -> float:
    return metrics.upstream_errors.labels("local", "external", worker, kind)._value.get()


def test_entering_another_worker_leaves_the_first() -> None:
    d, metrics, _ = _dispatcher()
    a, b = Worker("a", "http://127.0.0.1:1"), Worker("b", "http://127.0.0.1:2")
    ctx = Exchange(None)
    rec = RequestRecord("chat", "tiny", "", "", "", 0, 0.0, 0.0)
    d.enter(a, ctx, rec)
    assert (a.in_flight, b.in_flight, ctx.worker, rec.worker) == (1, 0, a, "a")
    d.enter(b, ctx, rec)  # a retry: the request is on b now
    assert (a.in_flight, b.in_flight, ctx.worker, rec.worker) == (0, 1, b, "b")
    gauge = metrics.worker_in_flight("tiny", b.region, b.preset, "b")
    assert gauge._value.get() == 1
    d.leave(ctx)
    d.leave(ctx)  # twice is harmless: the handler's exit path may follow a failed dispatch
    assert (b.in_flight, ctx.worker, gauge._value.get()) == (0, None, 0)


def test_a_worker_that_could_not_be_reached_is_counted_against_and_retried() -> None:
    d, metrics, _ = _dispatcher()
    w = Worker("w", "http://127.0.0.1:1")
    d.worker_failed(w, UpstreamError("connection refused"))  # returns: another worker may be tried
    assert w.consecutive_failures == 1 and _errors(metrics, "w", "unreachable") == 1
    d.worker_failed(w, UpstreamStatus(503, b'{"error": {"message": "busy"}}'))
    assert w.consecutive_failures == 2 and _errors(metrics, "w", "status_5xx") == 1


def test_the_workers_own_refusal_passes_through_without_counting_against_it() -> None:
    d, metrics, _ = _dispatcher()
    w = Worker("w", "http://127.0.0.1:1")
    refusal = UpstreamStatus(400, b'{"error": {"message": "bad request", "type": "BadRequestError"}}')
    with pytest.raises(UpstreamStatus) as raised:
        d.worker_failed(w, refusal)
    assert raised.value is refusal and w.consecutive_failures == 0
    assert _errors(metrics, "w", "status_4xx") == 1


def test_a_timeout_after_sending_is_never_retried() -> None:
    """The worker may still be generating: sending the same request to another one would run it twice. A long
    unstreamed answer (``generating``) is not the worker's fault; a stream that never started is."""
    d, _, _ = _dispatcher()
    w = Worker("w", "http://127.0.0.1:1")
    with pytest.raises(UpstreamTimeout):
        d.worker_failed(w, UpstreamTimeout("no answer within 1 s"))
    assert w.consecutive_failures == 1
    with pytest.raises(UpstreamTimeout):
        d.worker_failed(w, UpstreamTimeout("no answer within 1 s"), generating=True)
    assert w.consecutive_failures == 1
    d.worker_failed(w, UpstreamTimeout("connect", code="worker_connect_timeout"))  # before sending: retried
    assert w.consecutive_failures == 2


def test_a_tokenize_answer_does_not_clear_a_workers_failures() -> None:
    """vLLM's API server answers /tokenize also while its engine hangs: the generations timing out there must still
    add up to an ejection. Only a generation's first byte clears the count."""
    d, _, _ = _dispatcher()
    with ThreadedFakeWorker() as fake:
        w = Worker("w", fake.url)
        w.ready = True
        d.worker_failed(w, UpstreamError("connection refused"))
        async def ask() -> tuple[int, bytes, bytes | None]:
            try:
                return await d.tokenize((w,), b'{"model": "tiny", "prompt": "hi"}')
            finally:
                await d.pool.close()

        status, data, _ = asyncio.run(ask())
        assert status == 200 and b"count" in data
        assert w.consecutive_failures == 1
