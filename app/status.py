"""``GET /status``: each worker now and over the last half hour, from the gateway's own metrics.

A ``StatusSampler`` snapshots the injected CollectorRegistry every ``interval`` seconds into a ring buffer of
``horizon`` seconds, reduced at once to what the page shows per region/preset/worker (so memory stays bounded
whatever the label cardinality). Windowed TTFT p50/p95 come from histogram bucket deltas and tokens/s from counter
deltas — always against a fresh snapshot taken when the page asks, so the current numbers are those /metrics
shows. ``GET /status`` is one self-contained HTML page (app/static/status.html, no external assets) that renders
``GET /status.json`` and refetches it every few seconds.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from . import multiproc
from .advise import histogram_quantile
from .api import State
from .exposition import STEP, families
from .metrics import TTFT_BUCKETS
from .workers.registry import Registry

log = logging.getLogger("tokengate.status")

WorkerKey = tuple[str, str, str]  # region, preset, worker
CapKey = tuple[str, str, str, str]  # model, region, preset, reason
_BOUNDS = (*TTFT_BUCKETS, math.inf)
_LE_INDEX = {b: i for i, b in enumerate(_BOUNDS)}
_PLACEHOLDER = "/*STATUS_JSON*/null"


@dataclass(slots=True)
class WorkerPoint:
    """One worker's counters and gauges at one moment, summed over routes, models and statuses."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    completion_tokens: float = 0.0
    in_flight: float = 0.0
    up: float | None = None
    restarts: float = 0.0
    ttft: list[float] = field(default_factory=lambda: [0.0] * len(_BOUNDS))  # cumulative bucket counts


@dataclass(frozen=True, slots=True)
class Snapshot:
    t: float
    workers: dict[WorkerKey, WorkerPoint]
    caps: dict[CapKey, tuple[float, float]]  # (model, region, preset, reason) -> (clamps, rejections)
    unrouted: float  # requests answered before any worker was chosen (bad requests, caps, no worker)


# the families a snapshot reads; the others' samples are never made (exposition.families reads them lazily)
SNAPSHOT_FAMILIES = frozenset({
    "tokengate_requests", "tokengate_time_to_first_token_seconds", "tokengate_completion_tokens",
    "tokengate_requests_in_flight", "tokengate_worker_up", "tokengate_worker_restarts", "tokengate_cap_clamps",
    "tokengate_cap_rejections",
})


def take_snapshot(registry: Collector, now: float) -> Snapshot:
    out: list[Snapshot] = []
    for _ in snapshot_steps(registry, now, out):
        pass
    return out[0]


def snapshot_steps(registry: Collector, now: float, out: list[Snapshot]) -> Iterator[None]:
    """A snapshot of ``registry`` appended to ``out``, pausing (a bare ``yield``) every ``STEP`` samples read: with
    16 workers a snapshot reads ~5 000 samples, and it is taken on the event loop every ``interval``."""
    workers: dict[WorkerKey, WorkerPoint] = {}
    caps: dict[CapKey, tuple[float, float]] = {}
    unrouted = 0.0
    done = 0

    def point(labels: dict[str, str]) -> WorkerPoint:
        key = (labels.get("region", ""), labels.get("preset", ""), labels.get("worker", ""))
        p = workers.get(key)
        if p is None:
            p = workers[key] = WorkerPoint()
        return p

    for family, samples in families(registry):
        if family.name not in SNAPSHOT_FAMILIES:
            continue
        for name, labels, value, _ in samples:
            done += 1
            if done >= STEP:
                done = 0
                yield
            if name == "tokengate_requests_total":
                if not labels.get("worker"):
                    unrouted += value
                    continue
                p = point(labels)
                p.requests += value
                if labels.get("status", "").startswith("5"):
                    p.errors += value
            elif name == "tokengate_time_to_first_token_seconds_bucket" and labels.get("worker"):
                i = _LE_INDEX.get(float(labels["le"]))
                if i is not None:
                    point(labels).ttft[i] += value
            elif name == "tokengate_completion_tokens_total" and labels.get("worker"):
                point(labels).completion_tokens += value
            elif name == "tokengate_requests_in_flight":
                point(labels).in_flight += value
            elif name == "tokengate_worker_up":
                point(labels).up = value
            elif name == "tokengate_worker_restarts_total":
                point(labels).restarts += value
            elif name in ("tokengate_cap_clamps_total", "tokengate_cap_rejections_total"):
                ckey = (labels.get("model", ""), labels.get("region", ""), labels.get("preset", ""),
                        labels.get("reason", ""))
                clamps, rejections = caps.get(ckey, (0.0, 0.0))
                if name == "tokengate_cap_clamps_total":
                    clamps += value
                else:
                    rejections += value
                caps[ckey] = (clamps, rejections)
    out.append(Snapshot(now, workers, caps, unrouted))


async def take_snapshot_stepwise(registry: Collector, now: float) -> Snapshot:
    out: list[Snapshot] = []
    for _ in snapshot_steps(registry, now, out):
        await asyncio.sleep(0)
    return out[0]


def _since(new: float, old: float) -> float:
    return new - old if new >= old else new  # a counter that went down was reset: count from zero


def ttft_quantile(q: float, new: WorkerPoint, old: WorkerPoint | None) -> float | None:
    counts = new.ttft if old is None else [_since(n, o) for n, o in zip(new.ttft, old.ttft, strict=True)]
    return histogram_quantile(q, _BOUNDS, counts)


def tokens_per_second(new: WorkerPoint, old: WorkerPoint | None, dt: float) -> float | None:
    if old is None or dt <= 0:
        return None
    return _since(new.completion_tokens, old.completion_tokens) / dt


class StatusSampler:
    """``await sampler.run()`` in the lifespan; ``sampler.report(...)`` for the page."""

    def __init__(self, prom: CollectorRegistry, *, shared_dir: str | None = None, interval: float = 5.0,
                 horizon: float = 1800.0, window: float = 300.0, point_window: float = 60.0, max_points: int = 120,
                 clock: Callable[[], float] = time.time) -> None:
        self.prom = prom
        self.shared_dir = shared_dir  # --workers N: every process's values, summed, as /metrics shows them
        self.interval = interval
        self.horizon = horizon
        self.window = window  # the summary numbers (p50/p95, tokens/s) cover this many seconds
        self.point_window = point_window  # each sparkline point covers this many seconds
        self.max_points = max_points
        self.clock = clock
        self._history: deque[Snapshot] = deque(maxlen=max(2, int(horizon / interval) + 1))

    @property
    def history(self) -> tuple[Snapshot, ...]:
        return tuple(self._history)

    def sample(self) -> Snapshot:
        snap = take_snapshot(self.prom, self.clock())
        self._history.append(snap)
        return snap

    async def sample_stepwise(self) -> Snapshot:
        snap = await take_snapshot_stepwise(await multiproc.view(self.prom, self.shared_dir), self.clock())
        self._history.append(snap)
        return snap

    async def run(self) -> None:
        while True:
            try:
                await self.sample_stepwise()
            except Exception:  # a sampling bug must not end the history for good: the page says how far it goes
                log.exception("status sampler failed")
            await asyncio.sleep(self.interval)

    async def report(self, registry: Registry, *, draining: bool = False) -> dict[str, Any]:
        now = await take_snapshot_stepwise(await multiproc.view(self.prom, self.shared_dir), self.clock())
        return build_report([*self._history, now], registry, draining=draining, window=self.window,
                            point_window=self.point_window, max_points=self.max_points, interval=self.interval)


def _at_or_before(history: Sequence[Snapshot], times: Sequence[float], t: float) -> Snapshot:
    """The newest snapshot taken at or before ``t``; the oldest one when all are newer."""
    i = bisect.bisect_right(times, t)
    return history[max(0, i - 1)]


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None else round(v, digits)


def _series(history: Sequence[Snapshot], times: Sequence[float], key: WorkerKey, point_window: float,
            max_points: int) -> dict[str, list[float | None]]:
    step = max(1, math.ceil((len(history) - 1) / max_points))
    out: dict[str, list[float | None]] = {"t": [], "ttft_p95": [], "tokens_per_s": [], "in_flight": []}
    for i in range(len(history) - 1, 0, -step):
        snap = history[i]
        p = snap.workers.get(key)
        base = _at_or_before(history, times, snap.t - point_window)
        if base is snap:
            break
        old = base.workers.get(key)
        out["t"].append(round(snap.t, 3))
        out["ttft_p95"].append(_round(ttft_quantile(0.95, p, old)) if p is not None else None)
        out["tokens_per_s"].append(_round(tokens_per_second(p, old or WorkerPoint(), snap.t - base.t), 2)
                                   if p is not None else None)
        out["in_flight"].append(p.in_flight if p is not None else None)
    for values in out.values():
        values.reverse()
    return out


def build_report(history: Sequence[Snapshot], registry: Registry, *, draining: bool = False, window: float = 300.0,
                 point_window: float = 60.0, max_points: int = 120, interval: float = 5.0) -> dict[str, Any]:
    """What /status.json returns. ``history`` is oldest first and ends with the snapshot of now."""
    now = history[-1]
    times = [s.t for s in history]
    base = _at_or_before(history, times, now.t - window)
    dt = now.t - base.t
    live = {(w.region, w.preset, w.name): w for w in registry.workers()}
    workers: list[dict[str, Any]] = []
    for key in sorted(set(now.workers) | set(live)):
        region, preset, name = key
        p = now.workers.get(key, WorkerPoint())
        old = base.workers.get(key) if base is not now else None
        w = live.get(key)
        rate = _since(p.requests, old.requests) / dt if old is not None and dt > 0 else None
        workers.append({
            "region": region, "preset": preset, "worker": name,
            "up": p.up, "ready": w.ready if w is not None else bool(p.up),
            "reason": w.reason if w is not None else "not in the worker table",
            "models": sorted(w.models) if w is not None else [],
            "in_flight": p.in_flight, "requests": p.requests, "errors": p.errors, "restarts": p.restarts,
            "completion_tokens": p.completion_tokens,
            "requests_per_s": _round(rate),
            "ttft_p50": _round(ttft_quantile(0.5, p, old)),
            "ttft_p95": _round(ttft_quantile(0.95, p, old)),
            "tokens_per_s": _round(tokens_per_second(p, old or WorkerPoint(), dt), 2),
            "series": _series(history, times, key, point_window, max_points),
        })
    base_caps = base.caps if base is not now else {}
    caps = [
        {"model": ck[0], "region": ck[1], "preset": ck[2], "reason": ck[3], "clamps": c, "rejections": r,
         "clamps_window": _since(c, base_caps.get(ck, (0.0, 0.0))[0]),
         "rejections_window": _since(r, base_caps.get(ck, (0.0, 0.0))[1])}
        for ck, (c, r) in sorted(now.caps.items())
    ]
    return {
        "now": round(now.t, 3),
        "interval": interval,
        "window": window,
        "window_covered": round(dt, 3),
        "history_seconds": round(now.t - history[0].t, 3),
        "draining": draining,
        "totals": {
            "workers": len(workers),
            "workers_up": sum(1 for w in workers if w["up"]),
            "in_flight": sum(w["in_flight"] for w in workers),
            "requests": sum(w["requests"] for w in workers) + now.unrouted,
            "unrouted": now.unrouted,
        },
        "workers": workers,
        "caps": caps,
    }


def _script_json(data: Any) -> str:
    # inside <script>: "</script>" or "<!--" in a worker's reason must not end the element
    return orjson.dumps(data).decode().replace("<", "\\u003c")


def status_router(sampler: StatusSampler) -> APIRouter:
    """The /status page and its data, reading ``sampler``'s history."""
    router = APIRouter(tags=["ops"])
    page = resources.files(__package__).joinpath("static/status.html").read_text(encoding="utf-8")
    if _PLACEHOLDER not in page:  # pragma: no cover - a broken edit of the template
        raise RuntimeError("status.html lost its data placeholder")

    @router.get("/status", response_class=HTMLResponse)
    async def status_page(state: State) -> HTMLResponse:
        """Workers now and over the last half hour; refreshes itself from /status.json."""
        report = await sampler.report(state.registry, draining=state.proxy.draining)
        return HTMLResponse(page.replace(_PLACEHOLDER, _script_json(report)),
                            headers={"cache-control": "no-store"})

    @router.get("/status.json")
    async def status_json(state: State) -> Response:
        report = await sampler.report(state.registry, draining=state.proxy.draining)
        return Response(orjson.dumps(report), media_type="application/json", headers={"cache-control": "no-store"})

    return router
