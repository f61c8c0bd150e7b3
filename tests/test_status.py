"""app/status.py: the sampler's windowed numbers from a real registry, and the /status page rendered by headless
Chromium against a gateway in front of the real CPU vLLM engine, its numbers checked against /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from app.advise import histogram_quantile
from app.exposition import STEP
from app.metrics import TTFT_BUCKETS, GatewayMetrics, RequestRecord
from app.settings import Settings
from app.status import (
    SNAPSHOT_FAMILIES,
    Snapshot,
    StatusSampler,
    WorkerPoint,
    _script_json,
    build_report,
    snapshot_steps,
    take_snapshot,
    ttft_quantile,
)
from app.workers.registry import Registry, Worker

from .conftest import Engine
from .utils import metric_sum, run_gateway, scrape, wait_until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PAGE = ROOT / "app" / "static" / "status.html"
HELLO = [{"role": "user", "content": "Hello world, say ok!"}]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _request(metrics: GatewayMetrics, *, ttft: float | None = 0.1, worker: str = "w0", status: int = 200,
             tokens: int = 10, route: str = "chat") -> None:
    rec = RequestRecord(route, "m", "fr", "h100-1x", worker, status, arrival=0.0, end=1.0, prompt_tokens=5,
                        completion_tokens=tokens)
    if ttft is not None:
        rec.first_token, rec.last_token = ttft, 1.0
    metrics.observe_request(rec)


def _worker(name: str = "w0", *, ready: bool = True) -> Worker:
    w = Worker(name=name, url="http://127.0.0.1:1", region="fr", preset="h100-1x")
    w.ready, w.reason = ready, "ready" if ready else "unreachable"
    return w


# --- the sampler --------------------------------------------------------------------------------------------------

def test_snapshot_sums_each_worker_over_routes_models_and_statuses() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    _request(metrics, route="chat")
    _request(metrics, route="completions", status=502, ttft=None, tokens=0)
    _request(metrics, worker="", status=400, ttft=None, tokens=0)  # refused before routing
    metrics.worker_in_flight("m", "fr", "h100-1x", "w0").inc(3)
    metrics.worker_up.labels("fr", "h100-1x", "w0").set(1)
    metrics.worker_restarts.labels("fr", "h100-1x", "w0").inc(2)
    metrics.cap_clamps.labels("m", "fr", "h100-1x", "max_tokens_cap").inc(4)
    metrics.cap_rejections.labels("m", "fr", "h100-1x", "context_length").inc()
    snap = take_snapshot(metrics.registry, 5.0)
    p = snap.workers[("fr", "h100-1x", "w0")]
    assert (p.requests, p.errors, p.in_flight, p.up, p.restarts, p.completion_tokens) == (2, 1, 3, 1, 2, 10)
    assert p.ttft[-1] == 1 and snap.unrouted == 1
    assert snap.caps == {("m", "fr", "h100-1x", "max_tokens_cap"): (4, 0),
                         ("m", "fr", "h100-1x", "context_length"): (0, 1)}


def test_a_snapshot_is_read_in_steps_from_only_the_families_it_needs() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    for w in range(16):  # a gateway with 16 workers: thousands of samples
        for route, status in (("chat", 200), ("completions", 502), ("chat", 499)):
            _request(metrics, route=route, status=status, worker=f"w{w}")
    metrics.worker_in_flight("m", "fr", "h100-1x", "w0").inc(2)
    metrics.worker_up.labels("fr", "h100-1x", "w0").set(1)
    metrics.cap_clamps.labels("m", "fr", "h100-1x", "max_tokens_cap").inc(4)
    sampler = StatusSampler(metrics.registry, clock=lambda: 7.0)
    expected = take_snapshot(metrics.registry, 7.0)
    assert sampler.sample() == expected and len(expected.workers) == 16
    needed = sum(len(m.samples) for m in metrics.registry.collect() if m.name in SNAPSHOT_FAMILIES)
    everything = sum(len(m.samples) for m in metrics.registry.collect())
    assert needed > 4 * STEP and everything > 2 * needed
    # a pause every STEP samples, counting only the families a snapshot reads (the others are not even made)
    out: list[Snapshot] = []
    assert sum(1 for _ in snapshot_steps(metrics.registry, 7.0, out)) == needed // STEP and out == [expected]

    async def go() -> tuple[Snapshot, int]:
        ticks = 0

        async def other_work() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        start = ticks
        snap = await sampler.sample_stepwise()
        task.cancel()
        return snap, ticks - start

    snap, ran = asyncio.run(go())
    assert snap == expected and ran >= needed // STEP and sampler.history[-1] == expected


def test_window_quantiles_come_from_bucket_deltas() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    clock = Clock()
    sampler = StatusSampler(metrics.registry, interval=5, window=300, point_window=60, clock=clock)
    sampler.sample()
    for _ in range(20):
        _request(metrics, ttft=0.01)
    clock.t += 100
    sampler.sample()
    for _ in range(20):
        _request(metrics, ttft=2.5, tokens=31)
    clock.t += 300
    report = asyncio.run(sampler.report(Registry()))
    (w,) = report["workers"]
    # the window is the last 300 s: only the slow requests (the 2.0-3.0 s bucket), none of the fast ones
    assert 2.0 < w["ttft_p50"] <= w["ttft_p95"] <= 3.0
    assert w["requests"] == 40 and w["requests_per_s"] == pytest.approx(20 / 300, abs=1e-4)
    assert w["tokens_per_s"] == pytest.approx(20 * 31 / 300, abs=0.01)
    # all the buckets since start: p50 falls among the fast ones
    lifetime = ttft_quantile(0.5, take_snapshot(metrics.registry, 0).workers[("fr", "h100-1x", "w0")], None)
    assert lifetime is not None and lifetime <= 0.01
    assert report["window_covered"] == 300 and report["history_seconds"] == 400
    assert w["series"]["t"] == [1100.0, 1400.0]
    assert w["series"]["ttft_p95"][0] is not None and w["series"]["ttft_p95"][0] <= 0.01


def test_counter_reset_counts_from_zero() -> None:
    old, new = WorkerPoint(requests=50), WorkerPoint(requests=3)
    old.ttft[0], new.ttft[0] = 50, 3
    new.ttft = [3.0] * len(new.ttft)
    assert ttft_quantile(0.5, new, old) == histogram_quantile(0.5, (*TTFT_BUCKETS, float("inf")), new.ttft)


def test_history_is_bounded_by_the_horizon() -> None:
    clock = Clock()
    sampler = StatusSampler(CollectorRegistry(), interval=1, horizon=10, clock=clock)
    for _ in range(50):
        sampler.sample()
        clock.t += 1
    assert len(sampler.history) == 11
    assert sampler.history[0].t == 1039


def test_report_lists_registry_workers_without_traffic_and_thins_sparklines() -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    registry = Registry()
    registry.add(_worker("idle", ready=False))
    history = []
    for i in range(400):
        _request(metrics)
        history.append(take_snapshot(metrics.registry, 1000.0 + 5 * i))
    report = build_report(history, registry, max_points=120)
    idle = next(w for w in report["workers"] if w["worker"] == "idle")
    assert idle["ready"] is False and idle["reason"] == "unreachable" and idle["requests"] == 0
    busy = next(w for w in report["workers"] if w["worker"] == "w0")
    assert 100 <= len(busy["series"]["t"]) <= 120
    assert busy["series"]["t"][-1] == history[-1].t


def test_page_data_cannot_close_the_script_element() -> None:
    text = _script_json({"reason": "</script><script>alert(1)</script>"})
    assert "</" not in text and orjson.loads(text)["reason"].startswith("</script>")


def test_page_is_self_contained() -> None:
    html = PAGE.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", html), "external asset"
    assert "/*STATUS_JSON*/null" in html


# --- the page in a real browser -----------------------------------------------------------------------------------

class _Cells(HTMLParser):
    """The data-field/data-value cells of the worker rows (``data-worker``) and cap rows (``data-model``), the
    polylines drawn in each worker row, the text of elements with an id, and the body's refresh counter."""

    def __init__(self) -> None:
        super().__init__()
        self.workers: dict[str, dict[str, str]] = {}
        self.caps: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self.polylines: dict[str, int] = {}
        self.ids: dict[str, str] = {}
        self.refreshes = 0
        self._row: dict[str, str] | None = None
        self._worker: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.refreshes = int(a.get("data-refreshes", "0"))
        elif tag == "tr" and "data-worker" in a:
            self._worker = a["data-worker"]
            self._row = self.workers.setdefault(self._worker, {})
        elif tag == "tr" and "data-model" in a:
            self._row = self.caps.setdefault((a["data-model"], a["data-region"], a["data-preset"], a["data-reason"]),
                                             {})
        elif tag == "td" and self._row is not None and "data-field" in a:
            self._row[a["data-field"]] = a["data-value"]
        elif tag == "polyline" and self._worker is not None:
            self.polylines[self._worker] = self.polylines.get(self._worker, 0) + 1
        self._id = a.get("id")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = self._worker = None

    def handle_data(self, data: str) -> None:
        if self._id:
            self.ids[self._id] = data.strip()
            self._id = None


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: run scripts/install-system-deps.sh (installs Debian's chromium)")
    return path


def _browse(url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="tokengate-chromium-") as profile:
        argv = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@contextlib.contextmanager
def _paused(engine: Engine) -> Iterator[None]:
    """The worker's API server stopped (SIGSTOP): requests sent to it stay in flight until it resumes."""
    os.kill(engine.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(engine.proc.pid, signal.SIGCONT)


@pytest.mark.engine
def test_status_page_in_chromium_shows_what_metrics_says(engine: Engine) -> None:
    settings = Settings(upstream=[engine.url], upstream_api_key=engine.api_key, max_tokens_cap=16,
                        discovery_interval=120)
    with run_gateway(settings) as gw, httpx.Client(base_url=gw.url, timeout=120) as http:
        def chat(**extra: object) -> httpx.Response:
            body = {"model": engine.model, "messages": HELLO, "max_tokens": 8, **extra}
            return http.post("/v1/chat/completions", json=body)

        for _ in range(4):
            assert chat(stream=True, stream_options={"include_usage": True}).status_code == 200
        assert chat(stream=False).status_code == 200
        assert chat(stream=False, max_tokens=64).status_code == 200  # clamped to 16
        assert chat(model="no-such-model").status_code == 404  # answered before routing
        # a second burst after the sampler's next tick, so the sparklines have points to draw
        wait_until(lambda: len(http.get("/status.json").json()["workers"][0]["series"]["t"]) >= 2, 20,
                   "a second status sample")
        for _ in range(3):
            assert chat(stream=True).status_code == 200

        pending: list[httpx.Response] = []
        with _paused(engine):
            t = threading.Thread(target=lambda: pending.append(chat(stream=False)), daemon=True)
            t.start()
            wait_until(lambda: metric_sum(scrape(gw.url + "/metrics"), "tokengate_requests_in_flight") == 1, 20,
                       "one request in flight")
            metrics = scrape(gw.url + "/metrics")
            # 12 s of virtual time: the page's own 5 s refresh runs twice before the DOM is dumped
            dom = _browse(gw.url + "/status", "--virtual-time-budget=12000", "--dump-dom")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status.png"
            shot.unlink(missing_ok=True)
            _browse(gw.url + "/status", "--window-size=1400,800", "--hide-scrollbars", f"--screenshot={shot}")
        t.join(60)
        assert pending and pending[0].status_code == 200

    page = _Cells()
    page.feed(dom)
    assert page.refreshes >= 2, "the page did not refresh itself from /status.json"
    (name,) = page.workers
    row = page.workers[name]
    worker = {"worker": name}
    assert float(row["requests"]) == metric_sum(metrics, "tokengate_requests_total", **worker) == 9
    assert float(row["in_flight"]) == metric_sum(metrics, "tokengate_requests_in_flight", **worker) == 1
    assert float(row["up"]) == metric_sum(metrics, "tokengate_worker_up", **worker) == 1
    assert float(row["errors"]) == 0 and float(row["restarts"]) == 0
    buckets = sorted(((float(dict(labels)["le"]), v) for (n, labels), v in metrics.items()
                      if n == "tokengate_time_to_first_token_seconds_bucket" and dict(labels)["worker"] == name))
    merged: dict[float, float] = {}
    for le, v in buckets:
        merged[le] = merged.get(le, 0.0) + v
    p95 = histogram_quantile(0.95, list(merged), list(merged.values()))
    assert p95 is not None and float(row["ttft_p95"]) == pytest.approx(p95, abs=1e-4)
    assert float(row["ttft_p50"]) <= float(row["ttft_p95"])
    assert float(row["tokens_per_s"]) > 0
    assert page.ids["requests"] == str(int(metric_sum(metrics, "tokengate_requests_total"))) == "10"
    assert page.ids["in-flight"] == "1" and page.ids["workers-up"] == "1/1" and page.ids["unrouted"] == "1"
    (clamped,) = [dict(labels) for (n, labels), v in metrics.items() if n == "tokengate_cap_clamps_total" and v == 1]
    clamps = page.caps[(engine.model, clamped["region"], clamped["preset"], "max_tokens_cap")]  # the pool's row
    assert float(clamps["clamps"]) == metric_sum(metrics, "tokengate_cap_clamps_total", model=engine.model) == 1
    assert clamped["region"] and clamped["preset"]
    assert page.polylines.get(name, 0) >= 2, "sparklines drew nothing"
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
