"""Every tokengate metric, defined against an injected registry. Imports nothing else from app.

Labels come only from bounded sets: the route (two values), model names as configured or discovered from workers
(unknown names are folded into ``unknown``), region/preset/worker from configuration, status codes, fixed reasons.
Each request is observed once, when it ends — never once per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_M = TypeVar("_M", Counter, Gauge, Histogram)

# LLM latencies: from ~5 ms (a cached short prefill) to minutes (long generations under load).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
                10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)
TPS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0,
               750.0, 1000.0, 2000.0, 5000.0)
OVERHEAD_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

WORKER_LABELS = ("model", "region", "preset", "worker")
ROUTE_LABELS = ("route", *WORKER_LABELS)
# a cap is decided per pool (model x region) before a worker is chosen: its preset, or "mixed" when the pool's
# workers run several (routing.pool_labels)
CAP_LABELS = ("model", "region", "preset", "reason")

UNKNOWN = "unknown"
# the 5xx statuses the gateway answers with itself (and most worker failures): each key's series exist from 0
SERVER_ERRORS = ("500", "502", "503", "504")


@dataclass(slots=True)
class RequestRecord:
    """What one finished request tells the metrics. Times are ``time.perf_counter()`` seconds."""

    route: str
    model: str
    region: str
    preset: str
    worker: str
    status: int
    arrival: float
    end: float
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    dispatched: float | None = None
    streamed: bool = True  # TTFT is what a streaming client feels; a non-streaming one gets everything at the end
    # (pool region, pool preset, reason) of a max_tokens clamp: counted when the request ends, as requests_total
    # is, so that clamps / requests over a window never exceeds 1 while long answers run
    clamp: tuple[str, str, str] | None = None


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, *, version: str = "") -> None:
        self.registry = registry
        self.requests = Counter(
            "tokengate_requests", "Requests answered, by route, model, worker and HTTP status.",
            [*ROUTE_LABELS, "status"], registry=registry,
        )
        self.ttft = Histogram(
            "tokengate_time_to_first_token_seconds",
            "Request arrival to the first content token sent to the client.",
            ROUTE_LABELS, buckets=TTFT_BUCKETS, registry=registry,
        )
        self.tps = Histogram(
            "tokengate_output_tokens_per_second",
            "Decode-phase output tokens per second of one request (first to last token).",
            ROUTE_LABELS, buckets=TPS_BUCKETS, registry=registry,
        )
        self.itl = Histogram(
            "tokengate_inter_token_latency_seconds",
            "Mean time between output tokens of one request.",
            ROUTE_LABELS, buckets=ITL_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "tokengate_e2e_latency_seconds",
            "Request arrival to the last byte sent.",
            ROUTE_LABELS, buckets=E2E_BUCKETS, registry=registry,
        )
        self.prompt_tokens = Counter(
            "tokengate_prompt_tokens", "Prompt tokens, from the worker's usage.", WORKER_LABELS, registry=registry
        )
        self.completion_tokens = Counter(
            "tokengate_completion_tokens",
            "Completion tokens, from the worker's usage (tokens streamed before a disconnect included).",
            WORKER_LABELS, registry=registry,
        )
        self.in_flight = Gauge(
            "tokengate_requests_in_flight", "Requests being served, by worker.", WORKER_LABELS, registry=registry,
            multiprocess_mode="livesum",
        )
        self.cap_clamps = Counter(
            "tokengate_cap_clamps", "Requests whose max_tokens the gateway lowered, by reason.",
            CAP_LABELS, registry=registry,
        )
        self.cap_rejections = Counter(
            "tokengate_cap_rejections", "Requests refused by a cap, by reason.", CAP_LABELS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "tokengate_upstream_errors", "Failures talking to workers, by kind.",
            ["region", "preset", "worker", "kind"], registry=registry,
        )
        self.client_disconnects = Counter(
            "tokengate_client_disconnects", "Clients gone before the answer ended; the worker request is aborted.",
            ["route", "model", "region", "preset", "phase"], registry=registry,
        )
        self.overhead = Histogram(
            "tokengate_gateway_overhead_seconds",
            "Time spent inside the gateway: dispatch (arrival to upstream request written) and relay (per chunk); "
            "a write leaves at the end of its event-loop pass (--write-batch).",
            ["phase"], buckets=OVERHEAD_BUCKETS, registry=registry,
        )
        self.queue_time = Histogram(
            "tokengate_queue_time_seconds", "Time a request waited for admission to a worker pool.",
            ["model", "region"], buckets=QUEUE_BUCKETS, registry=registry,
        )
        self.write_stalls = Counter(
            "tokengate_write_stalls", "Streams dropped because the client stopped reading for longer than "
            "write_timeout (the worker request is aborted).", registry=registry,
        )
        self.busy_poll = Counter(
            "tokengate_busy_poll_seconds", "Seconds the event loop spent polling instead of sleeping (--busy-poll): "
            "about the CPU time busy polling costs.", registry=registry,
        )
        self.queue_depth = Gauge(
            "tokengate_queue_depth", "Requests waiting for admission to a worker pool.", ["model", "region"],
            registry=registry, multiprocess_mode="livesum",
        )
        self.admission_rejections = Counter(
            "tokengate_admission_rejections", "Requests refused by admission control: queue_full (429), "
            "queue_timeout (503), shutting_down.", ["model", "region", "reason"], registry=registry,
        )
        self.worker_up = Gauge(
            "tokengate_worker_up", "1 when the worker is ready and in rotation.",
            ["region", "preset", "worker"], registry=registry, multiprocess_mode="livemax",
        )
        self.worker_restarts = Counter(
            "tokengate_worker_restarts", "Managed worker restarts after a crash.",
            ["region", "preset", "worker"], registry=registry,
        )
        self.info = Info("tokengate_build", "tokengate version.", registry=registry)
        self.info.info({"version": version})
        self._route_children: dict[tuple[str, ...], tuple[Histogram, Histogram, Histogram, Histogram]] = {}
        self._worker_children: dict[tuple[str, ...], tuple[Counter, Counter]] = {}
        self._children: dict[tuple[object, ...], Any] = {}
        self._relay = self.overhead.labels("relay")
        self._dispatch = self.overhead.labels("dispatch")

    def _child(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, looked up once: labels() validates and joins its values on every call."""
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(_M, child)

    def worker_in_flight(self, model: str, region: str, preset: str, worker: str) -> Gauge:
        return self._child(self.in_flight, model, region, preset, worker)

    def queue_timer(self, model: str, region: str) -> Histogram:
        return self._child(self.queue_time, model, region)

    def observe_request(self, rec: RequestRecord) -> None:
        key = (rec.route, rec.model, rec.region, rec.preset, rec.worker)
        children = self._route_children.get(key)
        if children is None:
            children = (self.ttft.labels(*key), self.tps.labels(*key), self.itl.labels(*key), self.e2e.labels(*key))
            self._route_children[key] = children
            # from 0: rate() misses the first burst of a series that appears with it — this worker's, and its
            # pool's when no worker could take a request (worker "": an outage, proxy._label_outage)
            for worker in {rec.worker, ""}:
                for status in SERVER_ERRORS:
                    self._child(self.requests, *key[:4], worker, status)
        ttft, tps, itl, e2e = children
        self._child(self.requests, *key, str(rec.status)).inc()
        if rec.clamp is not None:
            self._child(self.cap_clamps, rec.model, *rec.clamp).inc()
        e2e.observe(rec.end - rec.arrival)
        if rec.dispatched is not None:
            self._dispatch.observe(rec.dispatched - rec.arrival)
        if rec.first_token is not None:
            if rec.streamed:
                ttft.observe(rec.first_token - rec.arrival)
            n = rec.completion_tokens
            if n is not None and n > 1 and rec.last_token is not None and rec.last_token > rec.first_token:
                decode = rec.last_token - rec.first_token
                tps.observe((n - 1) / decode)
                itl.observe(decode / (n - 1))
        if rec.prompt_tokens is not None or rec.completion_tokens is not None:
            wkey = (rec.model, rec.region, rec.preset, rec.worker)
            wchildren = self._worker_children.get(wkey)
            if wchildren is None:
                wchildren = (self.prompt_tokens.labels(*wkey), self.completion_tokens.labels(*wkey))
                self._worker_children[wkey] = wchildren
            if rec.prompt_tokens:
                wchildren[0].inc(rec.prompt_tokens)
            if rec.completion_tokens:
                wchildren[1].inc(rec.completion_tokens)

    def observe_relay(self, buckets: Mapping[int, int], seconds: float) -> None:
        """Once per stream: how long each relayed chunk spent inside the gateway, as counts by bucket of the
        histogram (``{i: chunks <= bound i}``, the last bound +Inf) and their sum. Each chunk is one observation,
        added at once — a histogram's observe() per chunk would take its lock once per token."""
        child = self._relay
        values = child._buckets
        for i, n in buckets.items():
            values[i].inc(n)
        child._sum.inc(seconds)
