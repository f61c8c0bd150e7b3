"""How long a scrape holds the gateway's event loop, before and after the stepwise renders:

* ``/metrics``: prometheus-client's generate_latest on the loop (before 2dd2d69) against app.exposition's
  stepwise render, on registries filled as a gateway with N workers fills them (two routes, five statuses per
  worker: ~250 lines a worker);
* ``/metrics/workers``: N vLLM-like expositions (~230 samples each) parsed, labelled and merged in a thread
  (before) against ``relabel_stepwise`` on the loop;
* ``multiprocess``: ``/metrics`` of ``--workers P``: the multiprocess files of P processes (``--processes``), each
  filled as above, merged by prometheus-client's ``MultiProcessCollector`` in one call (before) against
  ``app.multiproc.collect_stepwise``; both rendered stepwise.

A probe task sleeps 1 ms in a loop (uvloop, as the gateway runs) and records how late it wakes while each scrape
runs; rounds alternate the two arms.

    python -m bench.scrapelag [--workers 1,4,8,16 --rounds 30 --endpoints metrics,workers,multiprocess]

Prints, per endpoint and worker count: the scrape's time, and how late the probe woke — the worst wake of a
scrape (median over rounds) and the median wake — with ratios new/old.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from statistics import median

import uvloop
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from app.exposition import Exposition
from app.metrics import GatewayMetrics, RequestRecord
from app.multiproc import Families, collect_stepwise
from app.worker_metrics import PREFIX, UP, UP_HELP, relabel_stepwise
from app.workers.registry import Worker
from bench.overhead import RESULTS

Scrapes = list[tuple[Worker, str | None]]


def filled(workers: int) -> CollectorRegistry:
    reg = CollectorRegistry()
    m = GatewayMetrics(reg, version="bench")
    for w in range(workers):
        for route in ("chat", "completions"):
            for status in (200, 400, 499, 502, 504):
                m.observe_request(RequestRecord(route, "llama-3.1-8b", "fr", "h100-1x", f"fr-h100-1x-{w}", status,
                                                0.0, 1.0, 0.05, 0.9, 100, 200, 0.001))
        m.worker_in_flight("llama-3.1-8b", "fr", "h100-1x", f"fr-h100-1x-{w}").inc()
    return reg


def vllm_scrapes(workers: int) -> Scrapes:
    """What N vLLM workers' /metrics look like to the gateway: histograms of ~25 buckets, counters, gauges."""
    out: Scrapes = []
    for w in range(workers):
        reg = CollectorRegistry()
        for i in range(8):
            h = Histogram(f"vllm:latency_{i}_seconds", "A latency.", ["model_name", "engine"],
                          buckets=[0.001 * 2 ** k for k in range(25)], registry=reg)
            h.labels("llama-3.1-8b", "0").observe(0.05 * (i + 1))
        for i in range(10):
            Counter(f"vllm:counter_{i}", "A count.", ["model_name"], registry=reg).labels("llama-3.1-8b").inc(w)
            Gauge(f"vllm:gauge_{i}", "A level.", ["model_name"], registry=reg).labels("llama-3.1-8b").set(w)
        worker = Worker(name=f"fr-h100-1x-{w}", url=f"http://127.0.0.1:{9000 + w}", region="fr", preset="h100-1x")
        out.append((worker, generate_latest(reg).decode()))
    return out


def relabel_before(scrapes: Scrapes) -> bytes:
    """/metrics/workers before (it ran in a thread): each worker's text parsed whole, merged as prometheus-client
    Metric objects, then generate_latest. tests/test_worker_metrics.py holds the new code to the same bytes."""
    merged: dict[str, Metric] = {}
    up = GaugeMetricFamily(UP, UP_HELP, labels=["region", "preset", "worker"])
    for worker, text in scrapes:
        ours = {"region": worker.region, "preset": worker.preset, "worker": worker.name}
        try:
            families = [f for f in text_string_to_metric_families(text or "") if f.name.startswith(PREFIX)]
        except ValueError:
            text, families = None, []
        up.add_metric([worker.region, worker.preset, worker.name], 0.0 if text is None else 1.0)
        for f in families:
            target = merged.setdefault(f.name, Metric(f.name, f.documentation, f.type, f.unit))
            if target.type == f.type:
                for x in f.samples:
                    target.add_sample(x.name, {**x.labels, **ours}, x.value, x.timestamp, x.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*merged.values(), up]))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def measure(work: Callable[[], Awaitable[object]]) -> tuple[float, list[float]]:
    """(seconds, each wake's lateness in seconds) of one scrape with a 1 ms probe running."""
    lags: list[float] = []
    loop = asyncio.get_running_loop()
    stop = False

    async def probe() -> None:
        while not stop:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            lags.append(loop.time() - t0 - 0.001)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.005)
    lags.clear()
    t = time.perf_counter()
    await work()
    took = time.perf_counter() - t
    await asyncio.sleep(0.003)  # the probe's wake-up after the scrape
    stop = True
    await task
    return took, lags or [0.0]


FILL = """
import os, sys
sys.path.insert(0, os.getcwd())
from bench.scrapelag import filled
filled(int(sys.argv[1]))
"""


def multiprocess_files(path: Path, processes: int, workers: int) -> None:
    """The files ``processes`` gateway processes with ``workers`` workers behind them leave (real processes)."""
    for _ in range(processes):
        subprocess.run([sys.executable, "-c", FILL, str(workers)], check=True, timeout=120,
                       env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(path)))


def arms(kind: str, n: int, processes: int = 4,
         tmp: Path | None = None) -> tuple[dict[str, Callable[[], Awaitable[object]]], int]:
    ex = Exposition()
    if kind == "multiprocess":
        assert tmp is not None
        path = tmp / f"multiproc-{n}"
        path.mkdir()
        multiprocess_files(path, processes, n)
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(path))  # type: ignore[no-untyped-call]

        async def old_mp() -> object:
            return await ex.render_stepwise(reg)  # the collector's collect(): one call, then the stepwise render

        async def new_mp() -> object:
            return await ex.render_stepwise(Families(await collect_stepwise(str(path))))

        return {"old": old_mp, "new": new_mp}, generate_latest(reg).count(b"\n")
    if kind == "metrics":
        reg = filled(n)

        async def old() -> object:
            return generate_latest(reg)

        async def new() -> object:
            return await ex.render_stepwise(reg)

        return {"old": old, "new": new}, generate_latest(reg).count(b"\n")
    scrapes = vllm_scrapes(n)

    async def old_w() -> object:
        return await asyncio.to_thread(relabel_before, scrapes)

    async def new_w() -> object:
        return await relabel_stepwise(scrapes, ex)

    return {"old": old_w, "new": new_w}, relabel_before(scrapes).count(b"\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,4,8,16")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--endpoints", default="metrics,workers", help="of metrics, workers, multiprocess")
    p.add_argument("--processes", type=int, default=4, help="multiprocess: gateway processes whose files are merged")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    gc.collect()
    gc.freeze()  # as the gateway does once started (--gc-freeze, on by default)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="tokengate-scrapelag-"))
    for kind in a.endpoints.split(","):
        for n in (int(x) for x in a.workers.split(",")):
            work, lines = arms(kind, n, a.processes, tmp)
            res: dict[str, list[tuple[float, list[float]]]] = {"old": [], "new": []}

            async def go(work: dict[str, Callable[[], Awaitable[object]]] = work,
                         res: dict[str, list[tuple[float, list[float]]]] = res) -> None:
                for i in range(a.rounds):
                    for arm in (("old", "new") if i % 2 == 0 else ("new", "old")):
                        res[arm].append(await measure(work[arm]))

            uvloop.run(go())
            row: dict[str, float | int | str] = {"endpoint": kind, "workers": n, "lines": lines}
            if kind == "multiprocess":
                row["processes"] = a.processes
            for arm, vals in res.items():
                row[f"{arm}_ms"] = round(1000 * median(v[0] for v in vals), 2)
                row[f"{arm}_worst_lag_ms"] = round(1000 * median(max(v[1]) for v in vals), 2)
                row[f"{arm}_median_lag_ms"] = round(1000 * median(x for v in vals for x in v[1]), 3)
            rows.append(row)
            o, nw = row["old_worst_lag_ms"], row["new_worst_lag_ms"]
            name = {"metrics": "/metrics", "workers": "/metrics/workers"}.get(kind, f"/metrics, {a.processes} procs,")
            print(f"{name} {n:3d} workers, {lines:5d} lines: "
                  f"scrape {row['old_ms']:6.1f} -> {row['new_ms']:6.1f} ms; probe lateness, worst of a scrape "
                  f"{o:6.2f} -> {nw:5.2f} ms ({float(nw) / max(float(o), 1e-9):.2f}x), median wake "
                  f"{row['old_median_lag_ms']:5.2f} -> {row['new_median_lag_ms']:5.2f} ms", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    out = a.out / f"scrapelag-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rounds": a.rounds, "loop": "uvloop", "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
