"""Same-run A/B of two gateway trees against one fake worker: direct, A (a git revision) and B (the working tree),
interleaved round by round (the arm order rotates), each gateway on the gateway CPU, the worker and the load client
on the other. What an optimisation changes is a few per cent; on a shared 2-vCPU VM the same code moves by more
than that between runs, so a before/after is only worth the figures measured side by side.

    python -m bench.ab --old HEAD~1 -c 64 --rounds 8                         # paced (20 ms + 10 ms/token x 64)
    python -m bench.ab --old HEAD~1 -c 64 --ttft 0 --token-delay 0 --tokens 16   # saturation: CPU per request

Prints, for A and B: added TTFT and end-to-end p50/p90/p99 against direct (pooled over rounds), req/s and gateway
CPU per request (the measured window's CPU, from /proc, over the requests completed in it); writes the rounds as
JSON under bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.loadclient import Connection, RequestRecord, Target, chat_body, close_pool, percentile, run_closed
from bench.overhead import RESULTS, _round, free_port, raise_nofile, spawn, stop, wait_http

ARMS = ("direct", "A", "B")


@dataclass
class Arm:
    records: list[RequestRecord] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)


def export_tree(rev: str, dest: Path) -> Path:
    """``app/`` and ``presets/`` of ``rev`` (git archive): what a gateway process imports and loads."""
    data = subprocess.run(["git", "archive", "--format=tar", rev, "app", "presets"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def gateway_cmd(tree: Path, port: int, upstreams: list[str]) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from app.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "serve", "--host", "127.0.0.1", "--port", str(port),
            *(arg for u in upstreams for arg in ("--upstream", u)), "--log-level", "warning"]


SCRAPER = """
import sys, time, urllib.request
path, every = sys.argv[1], float(sys.argv[2])
while True:
    time.sleep(every)
    url = open(path).read().strip()
    if url:
        try:
            urllib.request.urlopen(url + "/metrics", timeout=30).read()
            print("ok", url, flush=True)
        except Exception as exc:  # say so and go on: a scrape that failed is a finding, not the end of the run
            print("failed", url, repr(exc), flush=True)
"""


def scrapes(log: Path) -> dict[str, int]:
    """How many of the scraper's GETs worked and failed (its log: one line a scrape)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return {k: sum(1 for line in lines if line.startswith(k + " ")) for k in ("ok", "failed")}


def start_scraper(current: Path, every: float, cpu: int, log: Path) -> subprocess.Popen[bytes]:
    """A process that GETs /metrics of the gateway named in ``current`` (a URL, or empty) every ``every`` seconds,
    as Prometheus would: only the gateway measured (the two share a CPU, the other's scrapes would land on it
    too), and from a process of its own (in the load client's loop it would delay the client's own reads)."""
    current.write_text("")
    return spawn([sys.executable, "-c", SCRAPER, str(current), str(every)], cpu, log)


def added(arm: list[float], direct: list[float], q: float) -> float:
    """Percentile ``q`` of ``arm`` minus that of ``direct`` (milliseconds in, milliseconds out)."""
    return percentile(sorted(arm), q) - percentile(sorted(direct), q)


def summary(arms: dict[str, Arm]) -> dict[str, dict[str, float]]:
    ttft = {k: [r.ttft * 1000 for r in a.records if r.ttft is not None] for k, a in arms.items()}
    e2e = {k: [r.e2e * 1000 for r in a.records] for k, a in arms.items()}
    out: dict[str, dict[str, float]] = {}
    for k in ("A", "B"):
        a = arms[k]
        row = {f"ttft_added_p{q}_ms": round(added(ttft[k], ttft["direct"], q), 3) for q in (50, 90, 99)}
        row |= {f"e2e_added_p{q}_ms": round(added(e2e[k], e2e["direct"], q), 3) for q in (50, 99)}
        row["rps"] = round(len(a.records) / a.elapsed, 1) if a.elapsed else 0.0
        row["cpu_us_per_request"] = round(a.cpu / len(a.records) * 1e6, 1) if a.records else 0.0
        out[k] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="git revision of arm A (arm B is the working tree)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--round-seconds", type=float, default=3.0)
    p.add_argument("--lead-in", type=float, default=2.0)
    p.add_argument("--ttft", type=float, default=0.02)
    p.add_argument("--token-delay", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-stream", action="store_true", help='"stream": false requests (the gateway gathers the '
                   "worker's stream into one answer)")
    p.add_argument("--count", choices=("remote", "local"), default="local",
                   help="local: the worker reports a generated tiny model the gateways count with; remote: /tokenize")
    p.add_argument("--workers", type=int, default=1,
                   help="fake workers behind each gateway (the direct arm uses the first): more label sets in /metrics")
    p.add_argument("--scrape-every", type=float, default=0.0,
                   help="seconds between GETs of /metrics of the gateway measured (0: none)")
    p.add_argument("--gateway-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    raise_nofile()
    os.sched_setaffinity(0, {a.client_cpu})
    logdir = a.out / "raw"
    logdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scraper_log = logdir / f"ab-scraper-{stamp}.log"
    root: list[str] = []
    if a.count == "local":
        from app.tinymodel import build_tiny_model

        root = ["--root", str(build_tiny_model(logdir / "tiny-model"))]
    trees = {"B": Path.cwd()}

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async def go(old_tree: Path) -> dict[str, Arm]:
        trees["A"] = old_tree
        wports = [free_port() for _ in range(a.workers)]
        workers = [spawn([sys.executable, "-m", "bench.fakeworker", "--port", str(wp), "--ttft", str(a.ttft),
                          "--token-delay", str(a.token_delay), *root], a.client_cpu,
                         logdir / f"ab-worker{i}-{stamp}.log") for i, wp in enumerate(wports)]
        worker = workers[0]
        gateways: dict[str, subprocess.Popen[bytes]] = {}
        pools: dict[str, list[Connection]] = {k: [] for k in ARMS}
        scraper: subprocess.Popen[bytes] | None = None
        try:
            for i, (wp, w) in enumerate(zip(wports, workers, strict=True)):
                wait_http(wp, "/health", w, logdir / f"ab-worker{i}-{stamp}.log", 10)
            upstreams = [f"http://127.0.0.1:{wp}" for wp in wports]
            body = chat_body(max_tokens=a.tokens, model="tiny", stream=not a.no_stream)
            targets = {"direct": Target.build(upstreams[0], body)}
            for k in ("A", "B"):
                port, glog = free_port(), logdir / f"ab-gateway-{k}-{stamp}.log"
                gateways[k] = spawn(gateway_cmd(trees[k], port, upstreams), a.gateway_cpu, glog)
                wait_http(port, "/readyz", gateways[k], glog, 60)
                targets[k] = Target.build(f"http://127.0.0.1:{port}", body)
            current = logdir / f"ab-scraped-{stamp}.txt"  # the gateway measured now
            if a.scrape_every > 0:
                scraper = start_scraper(current, a.scrape_every, a.client_cpu, scraper_log)
            for k, t in targets.items():
                await run_closed(t, concurrency=a.concurrency, duration=2, pool=pools[k])
            arms = {k: Arm() for k in ARMS}
            for i in range(a.rounds):
                for k in ARMS[i % 3:] + ARMS[:i % 3]:
                    gw = gateways[k if k != "direct" else "B"]
                    current.write_text("" if k == "direct" else f"http://127.0.0.1:{targets[k].port}")
                    res, gcpu, _ = await _round(targets[k], a.concurrency, a.round_seconds, a.lead_in, pools[k],
                                                gw.pid, worker.pid)
                    arm = arms[k]
                    arm.records += res.records
                    arm.elapsed += res.elapsed
                    arm.cpu += gcpu if k != "direct" else 0.0
                    s = res.summary()
                    arm.rounds.append(s)
                    say(f"  round {i + 1}/{a.rounds} {k:6s}: {s['rps']:8.1f} req/s  TTFT p50 "
                        f"{s['ttft_ms']['p50']:7.2f} p99 {s['ttft_ms']['p99']:7.2f} ms")
            return arms
        finally:
            if scraper is not None:
                stop(scraper)
            for pool in pools.values():
                close_pool(pool)
            for g in gateways.values():
                stop(g)
            for w in workers:
                stop(w)

    import uvloop

    with tempfile.TemporaryDirectory(prefix="tokengate-ab-") as tmp:
        arms = uvloop.run(go(export_tree(a.old, Path(tmp))))
    result = summary(arms)
    meta = {"timestamp": stamp, "old": a.old, "concurrency": a.concurrency, "rounds": a.rounds,
            "round_seconds": a.round_seconds, "lead_in": a.lead_in, "ttft": a.ttft, "token_delay": a.token_delay,
            "tokens": a.tokens, "stream": not a.no_stream, "count": a.count, "workers": a.workers,
            "scrape_every": a.scrape_every}
    if a.scrape_every > 0:
        meta["scrapes"] = scrapes(scraper_log)
        if meta["scrapes"]["failed"]:
            print(f"WARNING: {meta['scrapes']['failed']} scrapes failed (see {scraper_log})")
    out = logdir / f"ab-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "summary": result,
                               "rounds": {k: v.rounds for k, v in arms.items()}}, indent=2) + "\n")
    for k in ("A", "B"):
        r = result[k]
        label = f"A ({a.old})" if k == "A" else "B (working tree)"
        print(f"{label}: added TTFT p50 {r['ttft_added_p50_ms']:+.2f} p90 {r['ttft_added_p90_ms']:+.2f} "
              f"p99 {r['ttft_added_p99_ms']:+.2f} ms; e2e p50 {r['e2e_added_p50_ms']:+.2f} "
              f"p99 {r['e2e_added_p99_ms']:+.2f} ms; {r['rps']:.0f} req/s; {r['cpu_us_per_request']:.0f} µs CPU/req")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
