"""``GET /metrics/workers``: every registered worker's ``vllm:*`` metrics in one scrape.

Each worker's ``/metrics`` is fetched concurrently (short timeout) through the gateway's ``UpstreamPool``, its
``vllm:`` families are kept, and every sample gets the worker's ``region``, ``preset`` and ``worker`` labels
(ours win over a worker's own). Families are merged across workers, so the answer is valid Prometheus text. One
extra gauge per worker, ``tokengate_worker_metrics_up``, says whether its scrape worked (like Prometheus' ``up``).
Parsing and rendering run on the event loop in steps of ``STEP`` samples (``relabel_stepwise``): a vLLM
exposition is ~50 KB of text, and the loop carries the requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator, Sequence

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .api import State
from .errors import GatewayError
from .exposition import STEP, Exposition
from .upstream import UpstreamPool
from .workers.registry import Worker

log = logging.getLogger("tokengate.worker_metrics")

SCRAPE_TIMEOUT = 3.0
MAX_BYTES = 16 * 1024 * 1024
PREFIX = "vllm:"
PARSE_WEIGHT = 5  # the text parser: ~40 us a sample here, ~5x rendering a line (what STEP is sized by)


async def fetch_metrics(pool: UpstreamPool, worker: Worker, timeout: float = SCRAPE_TIMEOUT) -> str | None:
    """The worker's /metrics text, or None (logged) when it cannot be had within ``timeout``."""
    headers = [("authorization", f"Bearer {worker.api_key}")] if worker.api_key else []
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request(worker.origin, "GET", "/metrics", headers=headers, timeout=timeout)
            try:
                body = await resp.read(timeout, limit=MAX_BYTES)
            finally:
                resp.release()
    except (GatewayError, OSError, TimeoutError) as exc:
        log.debug("no metrics from worker %s: %s", worker.name, exc)
        return None
    if resp.status != 200:
        log.debug("worker %s answered /metrics with HTTP %d", worker.name, resp.status)
        return None
    return body.decode("utf-8", errors="replace")


class _Merged(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _up_family() -> GaugeMetricFamily:
    return GaugeMetricFamily("tokengate_worker_metrics_up", "1 when the gateway could scrape the worker's /metrics.",
                             labels=["region", "preset", "worker"])


def _merge_steps(scrapes: Sequence[tuple[Worker, str | None]], merged: dict[str, Metric],
                 up: GaugeMetricFamily) -> Iterator[None]:
    """``relabel``'s parsing and merging, pausing (a bare ``yield``) after about ``STEP`` samples (a parsed one
    counts ``PARSE_WEIGHT`` times). A worker's
    text is parsed whole before any of it is merged: one that turns out unparsable counts as down, nothing of it
    kept."""
    done = 0
    for worker, text in scrapes:
        ours = {"region": worker.region, "preset": worker.preset, "worker": worker.name}
        families: list[Metric] = []
        if text is not None:
            try:
                for family in text_string_to_metric_families(text):  # parsed family by family, as asked
                    if family.name.startswith(PREFIX):
                        families.append(family)
                    done += PARSE_WEIGHT * len(family.samples)
                    while done >= STEP:  # a pause per STEP units (one family may be worth several)
                        done -= STEP
                        yield
            except ValueError as exc:
                log.warning("worker %s sent unparsable metrics: %s", worker.name, exc)
                text, families = None, []
        up.add_metric([worker.region, worker.preset, worker.name], 0.0 if text is None else 1.0)
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif target.type != family.type:
                continue  # workers of different vLLM versions disagree: keep the first one's
            for s in family.samples:
                target.add_sample(s.name, {**s.labels, **ours}, s.value, s.timestamp, s.exemplar)
            done += len(family.samples)
            while done >= STEP:
                done -= STEP
                yield


def _registry(merged: dict[str, Metric], up: GaugeMetricFamily) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*merged.values(), up]))
    return registry


def relabel(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition | None = None) -> bytes:
    """Prometheus text of every worker's ``vllm:`` families, labelled and merged; ``None`` text: scrape failed."""
    merged: dict[str, Metric] = {}
    up = _up_family()
    for _ in _merge_steps(scrapes, merged, up):
        pass
    return (exposition or Exposition()).render(_registry(merged, up))


async def relabel_stepwise(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition) -> bytes:
    """``relabel`` on the event loop, given back every ``STEP`` samples (~1-2 ms): eight vLLM expositions are
    ~100 ms of parsing and rendering. Not a thread: uvloop takes the GIL for each callback, so while a thread
    parsed, every callback of the loop waited for the 5 ms switch interval."""
    merged: dict[str, Metric] = {}
    up = _up_family()
    for _ in _merge_steps(scrapes, merged, up):
        await asyncio.sleep(0)
    return await exposition.render_stepwise(_registry(merged, up))


async def scrape_workers(pool: UpstreamPool, workers: Sequence[Worker], exposition: Exposition,
                         timeout: float = SCRAPE_TIMEOUT) -> bytes:
    texts = await asyncio.gather(*(fetch_metrics(pool, w, timeout) for w in workers))
    return await relabel_stepwise(list(zip(workers, texts, strict=True)), exposition)


router = APIRouter(tags=["ops"])


@router.get("/metrics/workers")
async def worker_metrics(state: State) -> Response:
    """Every worker's vllm:* metrics with region/preset/worker labels (Prometheus job ``vllm-workers``)."""
    return Response(await scrape_workers(state.pool, state.registry.workers(), state.exposition),
                    media_type=CONTENT_TYPE_LATEST)
