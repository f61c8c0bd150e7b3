"""Does ``tokengate serve --workers N`` scale, and do its metrics stay right? For a host with cores to spare.

For each N: K fake workers (zero delay, 16 tokens) on their own cores, one ``tokengate serve --workers N
--upstream ...`` on N cores, L load-client processes (``bench.loadclient``, closed loop) on theirs. Rounds
alternate the gateway with the direct path (the same clients spread over the fake workers, same total
concurrency), so each N gets a same-run ratio to direct as well as a ratio to N = 1. After every gateway round the
requests the clients completed are compared with what the gateway's ``/metrics`` (prometheus-client multiprocess
mode, summed over the N processes) counted in ``tokengate_requests_total`` and ``tokengate_completion_tokens_total``.

    python -m bench.scale --gateway-workers 1,2,4,8 --gateway-cpus 0-7 --worker-cpus 8-11 --client-cpus 12-15

Needs at least max(N) + 2 cores to mean anything; on a 2-core machine it only checks the metrics. Writes
bench/results/scale-<timestamp>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.overhead import RESULTS, cpu_model, free_port, raise_nofile, spawn, stop, tree_cpu_seconds, wait_http

_SAMPLE = re.compile(r'^(tokengate_requests_total|tokengate_completion_tokens_total)\{([^}]*)\} ([0-9.e+]+)$')


def cpu_list(spec: str) -> list[int]:
    """``0-3,8`` -> [0, 1, 2, 3, 8]."""
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part.strip():
            out.append(int(part))
    return out


def counted(port: int) -> dict[str, float]:
    """The gateway's own count of answered requests (status 200) and of completion tokens."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_counts(r.read().decode())


def parse_counts(text: str) -> dict[str, float]:
    out = {"requests": 0.0, "completion_tokens": 0.0}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        if m.group(1) == "tokengate_requests_total":
            if 'status="200"' in m.group(2):
                out["requests"] += float(m.group(3))
        else:
            out["completion_tokens"] += float(m.group(3))
    return out


def load(urls: list[str], cpus: list[int], concurrency: int, seconds: float, tokens: int, logdir: Path
         ) -> dict[str, Any]:
    """One closed-loop round: len(cpus) client processes, ``concurrency`` streams in all, client i on urls[i % n]."""
    n = len(cpus)
    shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]

    def one(i: int) -> dict[str, Any]:
        cmd = ["taskset", "-c", str(cpus[i]), sys.executable, "-m", "bench.loadclient", urls[i % len(urls)],
               "-c", str(shares[i]), "-d", str(seconds), "--max-tokens", str(tokens)]
        with (logdir / f"client{i}.log").open("ab") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, timeout=seconds + 120, check=True)
        summary: dict[str, Any] = json.loads(proc.stdout)
        return summary

    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(one, [i for i in range(n) if shares[i] > 0]))
    return {"ok": sum(p["ok"] for p in parts), "errors": sum(p["errors"] for p in parts),
            "rps": round(sum(p["rps"] for p in parts), 1),
            "ttft_p50_ms": round(statistics.median(p["ttft_ms"]["p50"] for p in parts), 3),
            "ttft_p99_ms": round(max(p["ttft_ms"]["p99"] for p in parts), 3),
            "chunks_mean": round(statistics.mean(p["chunks_mean"] for p in parts), 2)}


def run_n(n: int, a: argparse.Namespace, worker_urls: list[str], logdir: Path, say: Any) -> dict[str, Any]:
    gcpus = a.gateway_cpus[:n]
    port = free_port()
    glog = logdir / f"gateway-w{n}.log"
    cmd = ["taskset", "-c", ",".join(map(str, gcpus)), sys.executable, "-m", "app.cli", "serve", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning", "--upstream", *worker_urls, *a.gateway_arg]
    if n > 1:
        cmd += ["--workers", str(n)]
    gateway = spawn(cmd, None, glog)
    conc = a.concurrency * n
    rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
    try:
        wait_http(port, "/readyz", gateway, glog, 90)
        gw_url = f"http://127.0.0.1:{port}"
        load([gw_url], a.client_cpus, conc, a.warmup_seconds, a.tokens, logdir)
        for i in range(a.rounds):
            for arm in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
                before = counted(port) if arm == "gateway" else None
                c0 = tree_cpu_seconds(gateway.pid)
                res = load(worker_urls if arm == "direct" else [gw_url], a.client_cpus, conc, a.round_seconds,
                           a.tokens, logdir)
                res["gateway_cpu_s"] = round(tree_cpu_seconds(gateway.pid) - c0, 3)
                if before is not None:
                    time.sleep(0.3)  # the last answers' observations land just after their final write
                    after = counted(port)
                    res["metrics_requests"] = after["requests"] - before["requests"]
                    res["metrics_completion_tokens"] = after["completion_tokens"] - before["completion_tokens"]
                    res["metrics_match"] = (res["metrics_requests"] == res["ok"]
                                            and res["metrics_completion_tokens"] == res["ok"] * a.tokens)
                rounds[arm].append(res)
                say(f"  N={n} round {i + 1}/{a.rounds} {arm:7s}: {res['rps']:9.1f} req/s, errors {res['errors']}, "
                    f"gateway CPU {res['gateway_cpu_s']:.2f} s"
                    + (f", metrics {'match' if res['metrics_match'] else 'MISMATCH'}" if arm == "gateway" else ""))
    finally:
        stop(gateway)
    g = statistics.median(r["rps"] for r in rounds["gateway"])
    d = statistics.median(r["rps"] for r in rounds["direct"])
    return {"gateway_workers": n, "gateway_cpus": gcpus, "concurrency": conc, "rounds": rounds,
            "gateway_rps": g, "direct_rps": d, "ratio_to_direct": round(g / d, 3) if d else None,
            "gateway_cpu_util": round(statistics.median(r["gateway_cpu_s"] / a.round_seconds
                                                        for r in rounds["gateway"]), 2),
            "metrics_all_match": all(r["metrics_match"] for r in rounds["gateway"])}


def table(results: list[dict[str, Any]]) -> str:
    base = results[0]["gateway_rps"] if results else 0.0
    lines = ["| gateway processes | streams | gateway req/s (median) | ÷ N=1 | efficiency | ÷ direct | "
             "gateway CPU util | metrics = client counts |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        speed = r["gateway_rps"] / base if base else float("nan")
        lines.append(f"| {r['gateway_workers']} | {r['concurrency']} | {r['gateway_rps']:.0f} | {speed:.2f} | "
                     f"{speed / r['gateway_workers']:.2f} | {r['ratio_to_direct']} | {r['gateway_cpu_util']} | "
                     f"{'yes' if r['metrics_all_match'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="tokengate --workers scaling (see module docstring).")
    p.add_argument("--gateway-workers", default="1,2,4")
    p.add_argument("--gateway-cpus", type=cpu_list, default=cpu_list("0-3"))
    p.add_argument("--worker-cpus", type=cpu_list, default=cpu_list("4-5"), help="one fake worker per CPU")
    p.add_argument("--client-cpus", type=cpu_list, default=cpu_list("6-7"), help="one load client per CPU")
    p.add_argument("--concurrency", type=int, default=64, help="streams per gateway process")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-seconds", type=float, default=5.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--count", choices=("remote", "local"), default="remote",
                   help="as bench.overhead: remote = a /tokenize call to the worker per request; local = the workers "
                        "report a generated tiny model's path and the gateway counts with its tokenizer")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra `tokengate serve` argument")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    ns = [int(x) for x in a.gateway_workers.split(",")]
    if max(ns) > len(a.gateway_cpus):
        raise SystemExit(f"--gateway-cpus has {len(a.gateway_cpus)} CPUs, fewer than N={max(ns)}")
    raise_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = a.out / "raw" / f"scale-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root: list[str] = []
    if a.count == "local":
        from app.tinymodel import build_tiny_model

        root = ["--root", str(build_tiny_model(logdir / "tiny-model"))]
    workers, urls = [], []
    try:
        for i, cpu in enumerate(a.worker_cpus):
            port = free_port()
            wlog = logdir / f"worker{i}.log"
            workers.append((spawn([sys.executable, "-m", "bench.fakeworker", "--port", str(port), "--ttft", "0",
                                   "--token-delay", "0", *root], cpu, wlog), port, wlog))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, port, wlog in workers:
            wait_http(port, "/health", proc, wlog, 30)
        results = [run_n(n, a, urls, logdir, say) for n in ns]
    finally:
        for proc, _, _ in workers:
            stop(proc)
    meta = {"timestamp": stamp, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "gateway_cpus": a.gateway_cpus,
            "worker_cpus": a.worker_cpus, "client_cpus": a.client_cpus, "tokens": a.tokens,
            "rounds": a.rounds, "round_seconds": a.round_seconds, "concurrency_per_process": a.concurrency,
            "gateway_args": a.gateway_arg, "prompt_count": a.count}
    out = a.out / f"scale-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
