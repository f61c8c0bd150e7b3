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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from .api import State
from .errors import GatewayError
from .exposition import STEP, Exposition, exposed_name
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


UP = "tokengate_worker_metrics_up"
UP_HELP = "1 when the gateway could scrape the worker's /metrics."
LINE_WEIGHT = PARSE_WEIGHT + 1  # a line parsed, then its sample relabelled and rendered
CHUNK_LINES = STEP // LINE_WEIGHT  # lines parsed and rendered between two looks at the loop


@dataclass
class _Family:
    """A merged family: its head and its samples' lines, rendered as parsed. Kept as text, not as prometheus-client
    ``Sample`` objects: a scrape's worth of those (a namedtuple and a label dict a sample) made every collection of
    the garbage collector's oldest generation tens of ms longer while it lasted, on the loop."""

    name: str
    type: str
    doc: str
    lines: list[str] = field(default_factory=list)


def _no_sample(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def _chunks(text: str, size: int = CHUNK_LINES) -> Iterator[tuple[str, int]]:
    """The text in pieces of ``size`` lines, cut at line ends, with how many of the text's lines each holds. A piece
    that starts inside a family starts with that family's ``# HELP``/``# TYPE`` lines again, and none ends in a
    comment (a family's ``# HELP`` without its ``# TYPE`` would parse as an untyped one), so it parses alone into
    the same samples under the same family (the merge by name joins the pieces again): one family of 100 000
    samples is parsed a few dozen lines at a time, not in one go."""
    head = ""  # the HELP/TYPE lines of the family the text is in
    head_name = ""
    start, end = 0, len(text)
    while start < end:
        stop = last = start
        taken = 0
        while stop < end and (taken < size or _no_sample(text[last:stop])):  # past size: not to end in a comment
            last, taken = stop, taken + 1
            stop = text.find("\n", stop) + 1 or end
        piece = text[start:stop]
        lines = piece.count("\n") + (not piece.endswith("\n"))
        yield (head + piece if head else piece), lines
        if "#" in piece:
            for line in piece.split("\n"):
                stripped = line.strip()
                if stripped.startswith("#"):
                    parts = stripped.split(None, 3)
                    if len(parts) > 2 and parts[1] in ("HELP", "TYPE"):
                        if parts[2] != head_name:
                            head, head_name = "", parts[2]
                        head += stripped + "\n"
        start = stop


def _merge_steps(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition,
                 merged: dict[str, _Family], up: list[str]) -> Iterator[None]:
    """``relabel``'s work, pausing (a bare ``yield``) after about ``STEP`` units: a line parsed, relabelled and
    rendered is ``LINE_WEIGHT`` units. A worker's text is all parsed before any of it is merged: one that turns out
    unparsable counts as down, nothing of it kept. Fills ``merged`` (by the name a family shows in the text, first
    seen first; of two families of one name but not one type, the first one's kept: Prometheus refuses a text
    with two TYPE lines for a name) and ``up`` (the up gauge's lines). A piece's lines of a family are kept
    joined: few objects for the collector to walk."""
    done = 0
    for worker, text in scrapes:
        ours = {"region": worker.region, "preset": worker.preset, "worker": worker.name}
        found: dict[str, _Family] = {}
        if text is not None:
            try:
                for piece, count in _chunks(text):
                    for f in text_string_to_metric_families(piece):
                        if f.name.startswith(PREFIX):
                            key = exposed_name(f.name, f.type)  # a counter x and a gauge x_total: one name
                            family = found.get(key)
                            if family is None:
                                family = found[key] = _Family(f.name, f.type, f.documentation)
                            elif family.type != f.type:
                                continue  # a name twice, of two types: the first one's kept (as across workers)
                            family.lines.append("".join([exposition.line(s.name, {**s.labels, **ours}, s.value,
                                                                         s.timestamp) for s in f.samples]))
                    done += LINE_WEIGHT * count
                    while done >= STEP:
                        done -= STEP
                        yield
            except ValueError as exc:
                log.warning("worker %s sent unparsable metrics: %s", worker.name, exc)
                text, found = None, {}
        up.append(exposition.line(UP, ours, 0.0 if text is None else 1.0))
        for key, family in found.items():
            target = merged.setdefault(key, _Family(family.name, family.type, family.doc))
            if target.type == family.type:  # workers of different vLLM versions may disagree: the first one wins
                target.lines += family.lines


def _text(exposition: Exposition, merged: dict[str, _Family], up: list[str]) -> bytes:
    families = [*merged.values(), _Family(UP, "gauge", UP_HELP, up)]
    return "".join(t for f in families for t in (exposition.head(f.name, f.type, f.doc), *f.lines)).encode("utf-8")


def relabel(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition | None = None) -> bytes:
    """Prometheus text of every worker's ``vllm:`` families, labelled and merged; ``None`` text: scrape failed."""
    exposition = exposition or Exposition()
    merged: dict[str, _Family] = {}
    up: list[str] = []
    for _ in _merge_steps(scrapes, exposition, merged, up):
        pass
    return _text(exposition, merged, up)


async def relabel_stepwise(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition) -> bytes:
    """``relabel`` on the event loop, given back every ``STEP`` units (~1-2 ms): eight vLLM expositions are
    ~100 ms of parsing and rendering. Not a thread: uvloop takes the GIL for each callback, so while a thread
    parsed, every callback of the loop waited for the 5 ms switch interval."""
    merged: dict[str, _Family] = {}
    up: list[str] = []
    for _ in _merge_steps(scrapes, exposition, merged, up):
        await asyncio.sleep(0)
    return _text(exposition, merged, up)


async def scrape_workers(pool: UpstreamPool, workers: Sequence[Worker], exposition: Exposition,
                         timeout: float = SCRAPE_TIMEOUT) -> bytes:
    texts = await asyncio.gather(*(fetch_metrics(pool, w, timeout) for w in workers))
    return await relabel_stepwise(list(zip(workers, texts, strict=True)), exposition)


router = APIRouter(tags=["ops"])


@router.get("/metrics/workers")
async def worker_metrics(state: State) -> Response:
    """Every worker's vllm:* metrics with region/preset/worker labels (Prometheus job ``vllm-workers``)."""
    return Response(await scrape_workers(state.pool, state.registry.workers(),
                                          state.worker_exposition),
                    media_type=CONTENT_TYPE_LATEST)
