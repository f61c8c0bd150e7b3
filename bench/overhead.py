"""What the gateway adds: client -> worker directly vs client -> gateway -> worker, in interleaved rounds.

Regimes (each with a warm-up, then ``--rounds`` rounds; the arm order alternates per round; each round runs
``--lead-in`` seconds before its measured window, so that the closed loop's start — all streams' first requests in
the same instant, after the other arm's round, on connections an idle timeout may have closed — is not mixed into
the steady state; that start is reported apart as the "start burst"):
  paced       a worker paced like a real engine (20 ms to first token, 10 ms per token, 64 tokens), 64 streams:
              added TTFT p50/p99 and added e2e (gateway percentile minus direct percentile, pooled over rounds).
  saturation  a zero-delay worker, 16 tokens, 64 streams: gateway req/s as a ratio to direct.
Pinning: the gateway on CPU 0; the load client (this process) and the fake worker on CPU 1.  Gateway CPU-seconds
per 1000 requests come from /proc/PID/stat (utime + stime of the gateway and its children) over each measured
window.

    python -m bench.overhead                                  # the real gateway (`tokengate serve`)
    python -m bench.overhead --count local                    # ... with the model's tokenizer on the gateway
    python -m bench.overhead --gateway naive                  # calibration: bench/naive_relay.py
    python -m bench.overhead --gateway-cmd 'mygw --port {port} --upstream {upstream}' --rounds 5 --round-seconds 4

Prints a markdown table and writes bench/results/overhead-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.loadclient import (
    Connection,
    LoadResult,
    RequestRecord,
    Target,
    chat_body,
    close_pool,
    run_closed,
    summarize,
)

RESULTS = Path(__file__).resolve().parent / "results"
_TOKENGATE = Path(sys.prefix) / "bin" / "tokengate"
GATEWAYS = {
    "tokengate": f"{_TOKENGATE} serve --host 127.0.0.1 --port {{port}} --upstream {{upstream}}",
    "naive": f"{sys.executable} -m bench.naive_relay --host 127.0.0.1 --port {{port}} --upstream {{upstream}}",
}


@dataclass(frozen=True)
class Regime:
    name: str
    ttft: float
    token_delay: float
    tokens: int
    about: str


REGIMES = {
    "paced": Regime("paced", 0.020, 0.010, 64, "20 ms TTFT + 10 ms/token x 64, c={c}"),  # c: --concurrency
    "saturation": Regime("saturation", 0.0, 0.0, 16, "zero-delay worker, 16 tokens, c={c}"),
}


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pinned(cmd: list[str], cpu: int | None) -> list[str]:
    if cpu is None:
        return cmd
    if shutil.which("taskset") is None:
        raise SystemExit("taskset not found (install util-linux) or pass --no-pin")
    return ["taskset", "-c", str(cpu), *cmd]


def spawn(cmd: list[str], cpu: int | None, log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as f:
        return subprocess.Popen(_pinned(cmd, cpu), stdout=f, stderr=subprocess.STDOUT, preexec_fn=raise_nofile,
                                start_new_session=True, env=env, cwd=cwd)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(10)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, 9)
            proc.wait(5)


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"process exited with {proc.returncode} before {path} answered; log tail:\n{tail}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise SystemExit(f"GET {path} on port {port} not 200 within {timeout:g} s ({last}); see {log}")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(pid: int) -> set[int]:
    """``pid`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None:
            parents[int(entry)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def pids_cpu_seconds(pids: set[int]) -> float:
    """utime + stime of these processes (cheap: no walk of /proc, for a snapshot taken mid-run)."""
    ticks = 0
    for pid in pids:
        if (fields := _stat_fields(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants."""
    return pids_cpu_seconds(tree_pids(pid))


@dataclass
class ArmData:
    records: list[RequestRecord] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    start: list[RequestRecord] = field(default_factory=list)  # each round's first request of every stream
    elapsed: float = 0.0
    gateway_cpu: float = 0.0
    worker_cpu: float = 0.0


async def _round(target: Target, conc: int, seconds: float, lead_in: float, pool: list[Connection], gw_pid: int,
                 wk_pid: int) -> tuple[LoadResult, float, float]:
    """One round: ``lead_in`` seconds unmeasured, then ``seconds`` measured: the requests completed in the window,
    and the CPU spent in it scaled to the records at the loop's rate (``run_closed``)."""
    gw, wk = tree_pids(gw_pid), tree_pids(wk_pid)
    at: list[tuple[float, float]] = []

    def snapshot() -> None:
        at.append((pids_cpu_seconds(gw), pids_cpu_seconds(wk)))

    res = await run_closed(target, concurrency=conc, duration=seconds, pool=pool, lead_in=lead_in,
                           on_window=snapshot, on_close=snapshot)
    (g0, w0), (g1, w1) = at
    return res, (g1 - g0) * res.window_scale, (w1 - w0) * res.window_scale


async def run_regime(reg: Regime, a: argparse.Namespace, logdir: Path, stamp: str,
                     say: Callable[[str], None]) -> dict[str, Any]:
    wport, gport = free_port(), free_port()
    pin = not a.no_pin
    wlog, glog = logdir / f"worker-{reg.name}-{stamp}.log", logdir / f"gateway-{reg.name}-{stamp}.log"
    root = ["--root", a.worker_root] if a.worker_root else []
    worker = spawn([sys.executable, "-m", "bench.fakeworker", "--port", str(wport), "--ttft", str(reg.ttft),
                    "--token-delay", str(reg.token_delay), *root], a.client_cpu if pin else None, wlog)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        wait_http(wport, "/health", worker, wlog, 10)
        upstream = f"http://127.0.0.1:{wport}"
        cmd = shlex.split(a.gateway_cmd.format(port=gport, upstream=upstream))
        env = dict(os.environ, **dict(kv.split("=", 1) for kv in a.gateway_env))
        gateway = spawn(cmd, a.gateway_cpu if pin else None, glog, env)
        wait_http(gport, "/readyz", gateway, glog, a.ready_timeout)
        body = chat_body(max_tokens=reg.tokens, model=a.model)
        targets = {"direct": Target.build(upstream, body),
                   "gateway": Target.build(f"http://127.0.0.1:{gport}", body, api_key=a.api_key)}
        for arm, t in targets.items():
            s = summarize((await run_closed(t, concurrency=1, requests=1, timeout=30)).records, 1.0)
            if s["ok"] != 1:
                raise SystemExit(f"{reg.name}: sanity request via {arm} failed: {s['error_kinds']}; see {glog}")
        pools: dict[str, list[Connection]] = {arm: [] for arm in targets}  # keep-alive across rounds
        for arm, t in targets.items():
            await run_closed(t, concurrency=a.concurrency, duration=a.warmup_seconds, pool=pools[arm])
        data = {arm: ArmData() for arm in targets}
        for i in range(a.rounds):
            for arm in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
                res, gcpu, wcpu = await _round(targets[arm], a.concurrency, a.round_seconds, a.lead_in, pools[arm],
                                               gateway.pid, worker.pid)
                d = data[arm]
                d.records += res.records
                d.start += res.firsts
                d.elapsed += res.elapsed
                d.gateway_cpu += gcpu
                d.worker_cpu += wcpu
                summ = res.summary()
                summ["gateway_cpu_s"], summ["worker_cpu_s"] = round(gcpu, 3), round(wcpu, 3)
                d.rounds.append(summ)
                say(f"  {reg.name} round {i + 1}/{a.rounds} {arm:7s}: {summ['rps']:9.1f} req/s  "
                    f"TTFT p50 {summ['ttft_ms']['p50']:8.2f} p99 {summ['ttft_ms']['p99']:8.2f} ms  "
                    f"errors {summ['errors']}  gateway CPU {gcpu:.2f} s")
        for pool in pools.values():
            close_pool(pool)
        return _analyse(reg, data)
    finally:
        if gateway is not None:
            stop(gateway)
        stop(worker)


def regimes_for(names: str, concurrency: int) -> list[Regime]:
    """The regimes named (comma-separated), each saying the concurrency it runs at."""
    return [replace(r, about=r.about.format(c=concurrency))
            for r in (REGIMES[n.strip()] for n in names.split(",") if n.strip())]


def _analyse(reg: Regime, data: dict[str, ArmData]) -> dict[str, Any]:
    out: dict[str, Any] = {"regime": reg.about, "arms": {}}
    for arm, d in data.items():
        s = summarize(d.records, d.elapsed)
        ok = max(1, s["ok"])
        s["gateway_cpu_s_per_1k"] = round(d.gateway_cpu / ok * 1000, 4)
        s["worker_cpu_s_per_1k"] = round(d.worker_cpu / ok * 1000, 4)
        s["rounds"] = d.rounds
        out["arms"][arm] = s
    dr, gw = out["arms"]["direct"], out["arms"]["gateway"]
    added = {}
    for metric in ("ttft_ms", "e2e_ms"):
        for q in ("p50", "p90", "p99"):
            added[f"{metric[:-3]}_{q}_ms"] = round(gw[metric][q] - dr[metric][q], 3)
    pairs = list(zip(gw["rounds"], dr["rounds"], strict=True))
    per_round = [g["ttft_ms"]["p50"] - d["ttft_ms"]["p50"] for g, d in pairs]
    per_round_p99 = [g["ttft_ms"]["p99"] - d["ttft_ms"]["p99"] for g, d in pairs]
    ratios = [g["rps"] / d["rps"] for g, d in zip(gw["rounds"], dr["rounds"], strict=True) if d["rps"]]
    out["added"] = added
    out["added_ttft_p50_ms_per_round"] = [round(x, 3) for x in per_round]
    out["added_ttft_p99_ms_per_round"] = [round(x, 3) for x in per_round_p99]
    out["added_ttft_p50_ms_median_round"] = round(statistics.median(per_round), 3)
    out["added_ttft_p99_ms_median_round"] = round(statistics.median(per_round_p99), 3)
    out["rps_ratio"] = round(gw["rps"] / dr["rps"], 4) if dr["rps"] else None
    out["rps_ratio_per_round"] = [round(x, 4) for x in ratios]
    out["rps_ratio_median"] = round(statistics.median(ratios), 4) if ratios else None
    if data["direct"].start and data["gateway"].start:  # the lead-in's synchronised start, reported apart
        starts = {arm: summarize(d.start, 1.0)["ttft_ms"] for arm, d in data.items()}
        out["start_burst_ttft_ms"] = starts
        out["start_burst_added_ttft_ms"] = {q: round(starts["gateway"][q] - starts["direct"][q], 3)
                                            for q in ("p50", "p99")}
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| regime | metric | direct | gateway | added / ratio |", "|---|---|---|---|---|"]
    for name, r in results.items():
        dr, gw = r["arms"]["direct"], r["arms"]["gateway"]
        label = f"{name}: {r['regime']}"
        if name == "paced":
            for metric, key in (("TTFT", "ttft_ms"), ("e2e", "e2e_ms")):
                for q in ("p50", "p99"):
                    d, g = dr[key][q], gw[key][q]
                    extra = ""
                    if key == "ttft_ms":
                        extra = f" (per-round median {r[f'added_ttft_{q}_ms_median_round']:+.2f})"
                    rows.append(f"| {label} | {metric} {q} ms | {d:.2f} | {g:.2f} | {g - d:+.2f} ms{extra} |")
                    label = ""
        else:
            rows.append(f"| {label} | req/s | {dr['rps']:.0f} | {gw['rps']:.0f} | {r['rps_ratio']:.3f}x "
                        f"(per-round median {r['rps_ratio_median']:.3f}x) |")
            d, g = dr["ttft_ms"]["p50"], gw["ttft_ms"]["p50"]
            rows.append(f"|  | TTFT p50 ms | {d:.2f} | {g:.2f} | {g - d:+.2f} ms |")
        if name == "paced" and "start_burst_ttft_ms" in r:
            d, g = r["start_burst_ttft_ms"]["direct"], r["start_burst_ttft_ms"]["gateway"]
            added = r["start_burst_added_ttft_ms"]
            rows.append(f"|  | start burst ({len(dr.get('rounds', []))} rounds x all streams at once, not in the "
                        f"rows above): TTFT p50 / p99 ms | {d['p50']:.2f} / {d['p99']:.2f} | "
                        f"{g['p50']:.2f} / {g['p99']:.2f} | {added['p50']:+.2f} / {added['p99']:+.2f} ms |")
        rows.append(f"|  | gateway CPU-s / 1000 req |  | {gw['gateway_cpu_s_per_1k']:.3f} |  |")
        errs = f"{dr['errors']} / {gw['errors']}"
        rows.append(f"|  | requests (errors) direct / gateway | {dr['requests']} | {gw['requests']} | {errs} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Gateway overhead vs direct (see module docstring).")
    p.add_argument("--gateway", choices=sorted(GATEWAYS), default="tokengate", help="preset gateway command")
    p.add_argument("--gateway-cmd", default=None, help="command with {port} and {upstream}; overrides --gateway")
    p.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--api-key", default=os.environ.get("TOKENGATE_BENCH_API_KEY"), help="sent to the gateway only")
    p.add_argument("--model", default="tiny")
    p.add_argument("--count", choices=("remote", "local"), default="remote",
                   help="remote: the worker reports no model path, so the gateway counts each prompt with a "
                        "/tokenize call to it (a worker on another machine); local: the worker reports the path of a "
                        "generated tiny model, whose tokenizer the gateway loads and counts with")
    p.add_argument("--regimes", default="paced,saturation")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-seconds", type=float, default=4.0)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--lead-in", type=float, default=2.0,
                   help="seconds each round runs before its measured window: the closed loop's synchronised start "
                        "(every stream's first request in the same instant, after the other arm's round) settles; "
                        "that start is reported apart as the 'start burst'")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--gateway-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1, help="CPU of the load client and the fake worker")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.gateway_cmd is None:
        a.gateway_cmd = GATEWAYS[a.gateway]
    if a.rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    raise_nofile()
    if not a.no_pin:
        os.sched_setaffinity(0, {a.client_cpu})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = a.out / "raw"
    logdir.mkdir(parents=True, exist_ok=True)
    a.worker_root = None
    if a.count == "local":
        from app.tinymodel import build_tiny_model

        a.worker_root = str(build_tiny_model(logdir / "tiny-model"))
    regimes = regimes_for(a.regimes, a.concurrency)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    async def go() -> dict[str, dict[str, Any]]:
        results = {}
        for reg in regimes:
            say(f"{reg.name}: {reg.about}; gateway: {a.gateway_cmd}")
            results[reg.name] = await run_regime(reg, a, logdir, stamp, say)
        return results

    import uvloop

    results = uvloop.run(go())
    meta = {"timestamp": stamp, "gateway_cmd": a.gateway_cmd, "prompt_count": a.count, "rounds": a.rounds,
            "round_seconds": a.round_seconds, "lead_in_seconds": a.lead_in,
            "warmup_seconds": a.warmup_seconds, "concurrency": a.concurrency, "pinned": not a.no_pin,
            "gateway_cpu": a.gateway_cpu, "client_cpu": a.client_cpu, "cpus": os.cpu_count(),
            "cpu_model": cpu_model(), "python": platform.python_version(),
            "ttft_definition": "send -> first SSE event with non-empty content",
            "percentiles": "pooled over rounds; added = gateway minus direct"}
    out = a.out / f"overhead-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten: {out}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
