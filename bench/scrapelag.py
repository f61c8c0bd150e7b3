"""How long a /metrics scrape holds the gateway's event loop: prometheus-client's generate_latest (what /metrics
ran before 2dd2d69) against app.exposition's stepwise render, on registries filled as a gateway with N workers
fills them (two routes, five statuses per worker: ~250 lines a worker). A probe task sleeps 1 ms in a loop and
records how late it wakes (event-loop lag) while each render runs; rounds alternate the two.

    python -m bench.scrapelag [--workers 1,4,8,16 --rounds 30]

Prints, per worker count: lines, render time, and the worst and p50 loop lag during a render (ratios new/old).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from statistics import median

from prometheus_client import CollectorRegistry, generate_latest

from app.exposition import Exposition
from app.metrics import GatewayMetrics, RequestRecord
from bench.overhead import RESULTS


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


async def measure(reg: CollectorRegistry, ex: Exposition, stepwise: bool) -> tuple[float, float]:
    """(render seconds, worst lag seconds) of one render with a 1 ms probe running."""
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
    if stepwise:
        await ex.render_stepwise(reg)
    else:
        generate_latest(reg)
    took = time.perf_counter() - t
    await asyncio.sleep(0.003)  # the probe's wake-up after the render
    stop = True
    await task
    return took, max(lags, default=0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,4,8,16")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in a.workers.split(",")):
        reg, ex = filled(n), Exposition()
        lines = generate_latest(reg).count(b"\n")
        res: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}

        async def go(reg: CollectorRegistry = reg, ex: Exposition = ex,
                     res: dict[str, list[tuple[float, float]]] = res) -> None:
            for i in range(a.rounds):
                for arm in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    res[arm].append(await measure(reg, ex, arm == "new"))

        asyncio.run(go())
        row: dict[str, float | int] = {"workers": n, "lines": lines}
        for arm, vals in res.items():
            row[f"{arm}_render_ms"] = round(1000 * median(v[0] for v in vals), 2)
            row[f"{arm}_lag_p50_ms"] = round(1000 * median(v[1] for v in vals), 2)
            row[f"{arm}_lag_max_ms"] = round(1000 * max(v[1] for v in vals), 2)
        rows.append(row)
        print(f"{n:3d} workers, {lines:5d} lines: render {row['old_render_ms']:6.2f} -> {row['new_render_ms']:6.2f} ms "
              f"({row['new_render_ms'] / row['old_render_ms']:.2f}x); loop lag per scrape, median "
              f"{row['old_lag_p50_ms']:6.2f} -> {row['new_lag_p50_ms']:5.2f} ms "
              f"({row['new_lag_p50_ms'] / max(row['old_lag_p50_ms'], 1e-9):.2f}x), worst "
              f"{row['old_lag_max_ms']:6.2f} -> {row['new_lag_max_ms']:5.2f} ms", flush=True)
    out = a.out / f"scrapelag-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rounds": a.rounds, "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
