"""``bench/compare.py``'s bookkeeping: per-arm accumulation, added latency against direct, the machine header, the
markdown tables and the plots (``bench/compare_plot.py``, run in the plot venv when matplotlib is not here)."""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import peers
from bench.loadclient import LoadResult, RequestRecord, percentile, summarize
from bench.overhead import cpu_model

LABEL = {"direct": "direct", "tokengate": "tokengate", "vllm-router": "vllm-router", "litellm": "LiteLLM"}
PEERS = ("vllm-router", "litellm")
_REPO = Path(__file__).resolve().parent.parent


@dataclass
class ArmRun:
    records: list[RequestRecord] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def add(self, res: LoadResult, cpu: dict[str, float]) -> None:
        self.records += res.records
        self.elapsed += res.elapsed
        for k, v in cpu.items():
            self.cpu[k] = self.cpu.get(k, 0.0) + v
        s = res.summary()
        self.rounds.append({"requests": s["requests"], "errors": s["errors"], "rps": s["rps"],
                            "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
                            "e2e_p50_ms": s["e2e_ms"]["p50"], "e2e_p99_ms": s["e2e_ms"]["p99"],
                            "elapsed_s": s["elapsed_s"], **{f"{k}_cpu_s": round(v, 4) for k, v in cpu.items()}})


def _cpu_fields(s: dict[str, Any], cpu: dict[str, float], elapsed: float, arm: str) -> None:
    ok, el = max(1, s["ok"]), max(elapsed, 1e-9)
    gw = arm != "direct"
    # /proc/PID/stat utime+stime: 10 ms ticks, but it includes threads that have exited (LiteLLM starts short-lived
    # ones); schedstat: ns, live threads only.  They agree within a few % for tokengate and vllm-router.
    s["gateway_cpu_s_per_1k"] = round(cpu["gateway_ticks"] / ok * 1000, 4) if gw else None
    s["gateway_cpu_s_per_1k_schedstat"] = round(cpu["gateway"] / ok * 1000, 4) if gw else None
    s["gateway_util"] = round(cpu["gateway_ticks"] / el, 3)
    s["worker_cpu_s_per_1k"] = round(cpu["worker"] / ok * 1000, 4)
    s["client_util"] = round(cpu["client"] / el, 3)
    s["core1_util"] = round((cpu["client"] + cpu["worker"]) / el, 3)  # load client + worker
    s["others_util"] = round(cpu["others"] / el, 3)  # the idle arms on the gateway CPU during this arm's runs
    s["foreign_gateway_cpu_util"] = round(cpu["foreign_gateway_cpu"] / el, 3)  # the rest of the machine on CPU 0
    s["foreign_client_cpu_util"] = round(cpu["foreign_client_cpu"] / el, 3)


def analyse_cell(runs: dict[str, ArmRun]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, r in runs.items():
        s = summarize(r.records, r.elapsed)
        _cpu_fields(s, r.cpu, r.elapsed, arm)
        s["rounds"] = r.rounds
        out[arm] = s
    d = out.get("direct")
    if d is None:
        return out
    for arm, s in out.items():
        if arm == "direct":
            continue
        s["added_ms"] = {f"{m[:-3]}_{q}": round(s[m][q] - d[m][q], 3) for m in ("ttft_ms", "e2e_ms")
                         for q in ("p50", "p90", "p99")}
        pairs = list(zip(s["rounds"], d["rounds"], strict=False))
        for q in ("p50", "p99"):
            s[f"added_ttft_{q}_ms_median_round"] = round(statistics.median(
                g[f"ttft_{q}_ms"] - x[f"ttft_{q}_ms"] for g, x in pairs), 3) if pairs else None
        ratios = [g["rps"] / x["rps"] for g, x in pairs if x["rps"]]
        s["rps_ratio"] = round(s["rps"] / d["rps"], 4) if d["rps"] else None
        s["rps_ratio_median_round"] = round(statistics.median(ratios), 4) if ratios else None
    return out


def _dist_ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {f"p{q}": round(percentile(v, q) * 1000, 3) for q in (50, 90, 99)}


def open_summary(res: LoadResult, cpu: dict[str, float], arm: str) -> dict[str, Any]:
    """An open-loop step.  ``ttft_sched_ms``: TTFT from the scheduled arrival (send lag, connecting included, +
    TTFT), so a gateway slow to accept is not hidden (coordinated omission)."""
    s = summarize(res.records, res.elapsed)
    ok = [r for r in res.records if r.ok and r.ttft is not None]
    s["ttft_sched_ms"] = _dist_ms([r.ttft + r.lag for r in ok if r.ttft is not None])
    s["lag_ms"] = _dist_ms([r.lag for r in res.records])
    _cpu_fields(s, cpu, res.elapsed, arm)
    return s


def judge(s: dict[str, Any], ref: dict[str, Any] | None, limit_ms: float) -> str | None:
    """None when an open-loop step holds: >= 99.9 % success and p99 TTFT (from the scheduled arrival) within
    ``limit_ms`` of the reference's."""
    n = s["requests"]
    if n == 0:
        return "no requests"
    if s["ok"] / n < 0.999:
        kinds = s.get("error_kinds") or {}
        first = next(iter(kinds), "")
        return f"success {s['ok'] / n:.2%} ({s['errors']} errors; {first[:80]})"
    if ref is not None:
        added = s["ttft_sched_ms"]["p99"] - ref["ttft_sched_ms"]["p99"]
        if not added < limit_ms:
            return f"p99 TTFT +{added:.1f} ms over direct"
    return None


class RawWriter:
    """Every request, gzipped CSV: regime, mode, load, arm, round, start, ttft_ms, e2e_ms, chunks, status, ..."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = gzip.open(path, "wt", newline="", compresslevel=3)
        self._w = csv.writer(self._f)
        self._w.writerow(["regime", "mode", "load", "arm", "round", "start_s", "ttft_ms", "e2e_ms", "chunks", "status",
                          "done", "lag_ms", "error"])

    def write(self, regime: str, mode: str, load: str, arm: str, rnd: int, records: list[RequestRecord]) -> None:
        for r in records:
            self._w.writerow([regime, mode, load, arm, rnd, f"{r.start:.6f}",
                              "" if r.ttft is None else f"{r.ttft * 1000:.3f}", f"{r.e2e * 1000:.3f}", r.chunks,
                              r.status, int(r.done), f"{r.lag * 1000:.3f}", r.error or ""])

    def __enter__(self) -> RawWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _dist(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def machine(a: argparse.Namespace) -> dict[str, Any]:
    if a.tokengate_rev:
        tg = f"{_dist('tokengate')} (git {_git('rev-parse', '--short', a.tokengate_rev)}, exported with git archive)"
    else:
        dirty = bool(_git("status", "--porcelain", "--", "app"))
        extra = " + uncommitted app/ changes" if dirty else ""
        tg = f"{_dist('tokengate')} (git {_git('rev-parse', '--short', 'HEAD')}{extra})"
    return {
        "command": "python -m bench.compare " + " ".join(sys.argv[1:]),
        "cpu_model": cpu_model(), "cpus_online": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
        "kernel": platform.release(), "platform": platform.platform(), "python": platform.python_version(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "load_avg_start": list(os.getloadavg()),
        "versions": {"tokengate": tg,
                     "vllm-router": peers.version("vllm-router"), "litellm": peers.version("litellm"),
                     "uvloop": _dist("uvloop"), "httptools": _dist("httptools"), "matplotlib": peers.version("plot")},
        "pinning": f"gateways on CPU {a.gateway_cpu} (taskset -c); load client (sched_setaffinity) and fake worker "
                   f"(taskset -c) on CPU {a.client_cpu}",
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
    }


def _ms(v: float | None, signed: bool = False) -> str:
    if v is None or v != v:
        return "–"
    s = f"{v:+.2f}" if signed else f"{v:.2f}"
    if abs(v) >= 100:
        s = f"{v:+.0f}" if signed else f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:+.1f}" if signed else f"{v:.1f}"
    return s


def _num(v: float | None, digits: int = 0) -> str:
    return "–" if v is None or v != v else f"{v:,.{digits}f}"


def _cmp(t: float | None, p: float | None, kind: str) -> str:
    if t is None or p is None or t != t or p != p:
        return "–"
    if kind == "diff":
        return f"{t - p:+.2f} ms" if abs(t - p) < 100 else f"{t - p:+.0f} ms"
    return f"{t / p:.2f}×" if p else "–"


def _headline(res: dict[str, Any], arms: list[str]) -> list[str]:
    peers_here = [p for p in PEERS if p in arms]
    cols = ["metric", *[LABEL[x] for x in arms], *[f"tokengate vs {LABEL[p]}" for p in peers_here]]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def row(label: str, vals: dict[str, float | None], fmt: Callable[[float | None], str], kind: str,
            shown: dict[str, str] | None = None) -> None:
        t = vals.get("tokengate")
        cmp = [_cmp(t, vals.get(p), kind) for p in peers_here] if "tokengate" in arms else ["–"] * len(peers_here)
        cells = [(shown or {}).get(x) or fmt(vals.get(x)) for x in arms]
        rows.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(cmp) + " |")

    for cell in res["fixed"]:
        if cell["concurrency"] not in (1, 64, 256):
            continue
        A, tag = cell["arms"], f"paced {cell['mode']} c={cell['concurrency']}"
        for q in ("p50", "p99"):
            row(f"{tag}: added TTFT {q} (ms)", {x: (0.0 if x == "direct" else A[x]["added_ms"][f"ttft_{q}"])
                                               for x in A}, lambda v: _ms(v, True), "diff")
        row(f"{tag}: gateway CPU-s / 1000 req", {x: A[x]["gateway_cpu_s_per_1k"] for x in A},
            lambda v: _num(v, 2), "ratio")
    for cell in res["saturation"]:
        A = cell["arms"]
        row(f"saturation {cell['mode']} c={cell['concurrency']}: req/s", {x: A[x]["rps"] for x in A}, _num, "ratio")
        row(f"saturation {cell['mode']} c={cell['concurrency']}: req/s ÷ direct",
            {x: A[x].get("rps_ratio", 1.0) for x in A}, lambda v: _num(v, 3), "ratio")
    for sw in res["sweep"]:
        row(f"open loop {sw['mode']}: max rate held (req/s)", {x: m["rate"] for x, m in sw["max"].items()}, _num,
            "ratio", {x: _held(sw, x) for x in sw["max"]})
    return rows


def _held(sw: dict[str, Any], arm: str) -> str:
    m = sw["max"][arm]
    if m["rate"] is None:
        return f"< {_num(m['first_fail'])}"
    if m["first_fail"] is None:
        return f"≥ {_num(m['rate'])}"
    return _num(m["rate"])


def _fixed_table(cells: list[dict[str, Any]]) -> list[str]:
    head = ["mode", "c", "arm", "requests", "errors", "req/s", "÷ direct", "TTFT p50", "TTFT p99", "+TTFT p50",
            "+TTFT p99", "+TTFT p50 (median of rounds)", "e2e p50", "e2e p99", "+e2e p50", "+e2e p99",
            "gateway CPU-s / 1k req", "gateway CPU util", "CPU 0 foreign load", "CPU 1 util (client + worker)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        for arm, s in cell["arms"].items():
            ad = s.get("added_ms", {})
            rows.append("| " + " | ".join([
                cell["mode"], str(cell["concurrency"]), LABEL[arm], str(s["requests"]), str(s["errors"]),
                _num(s["rps"]), _num(s.get("rps_ratio", 1.0), 3), _ms(s["ttft_ms"]["p50"]), _ms(s["ttft_ms"]["p99"]),
                _ms(ad.get("ttft_p50"), True), _ms(ad.get("ttft_p99"), True),
                _ms(s.get("added_ttft_p50_ms_median_round"), True), _ms(s["e2e_ms"]["p50"]), _ms(s["e2e_ms"]["p99"]),
                _ms(ad.get("e2e_p50"), True), _ms(ad.get("e2e_p99"), True), _num(s["gateway_cpu_s_per_1k"], 3),
                _num(s["gateway_util"], 2) if arm != "direct" else "–", _num(s["foreign_gateway_cpu_util"], 2),
                _num(s["core1_util"], 2)]) + " |")
        for arm, why in cell.get("skipped", {}).items():
            rows.append(f"| {cell['mode']} | {cell['concurrency']} | {LABEL[arm]} | not run: {why} |" + " |" * 16)
    return rows


def _sweep_table(sweeps: list[dict[str, Any]]) -> list[str]:
    rows = ["| mode | arm | max rate held (req/s) | ÷ direct's | at that rate: +TTFT p99 (ms), gateway CPU-s / 1k, "
            "CPU util | first failed rate | why | steps |", "|---|---|---|---|---|---|---|---|"]
    for sw in sweeps:
        dmax = sw["max"]["direct"]["rate"]
        for arm, m in sw["max"].items():
            mine = [s for s in sw["steps"] if s["arm"] == arm]
            at = [s for s in mine if s["rate"] == m["rate"] and s.get("why") is None]
            detail = "–"
            if at and arm != "direct":
                s = at[-1]
                detail = f"{_ms(s['added_ttft_p99_ms'], True)}, {_num(s['gateway_cpu_s_per_1k'], 3)}, " \
                         f"{_num(s['gateway_util'], 2)}"
            ratio = _num(m["rate"] / dmax, 3) if m["rate"] and dmax else "–"
            rows.append(f"| {sw['mode']} | {LABEL[arm]} | {_held(sw, arm)} | {ratio} | {detail} | "
                        f"{_num(m['first_fail'])} | {m['why'] or '–'} | {len(mine)} |")
    return rows


def render(res: dict[str, Any], info: dict[str, Any]) -> str:
    a = info["settings"]
    v = info["versions"]
    arms = [x for x in a["arms"] if any(x in c["arms"] for c in res["fixed"] + res["saturation"])] or a["arms"]
    out = ["# tokengate vs vllm-router vs LiteLLM vs direct (`bench/compare.py`)", "",
           f"Run {info['timestamp']}, {info['runtime_s']:.0f} s: `{info['command']}`", "",
           f"* Machine: {info['cpu_model']}, {info['cpus_online']} CPUs online ({info['cpus_allowed']} allowed), "
           f"kernel {info['kernel']}, Python {info['python']}, `ulimit -n` {info['nofile']}; load average "
           f"{', '.join(f'{x:.2f}' for x in info['load_avg_start'])} at start, "
           f"{', '.join(f'{x:.2f}' for x in info['load_avg_end'])} at the end (other work shares these CPUs).",
           f"* Versions: tokengate {v['tokengate']}, vllm-router {v['vllm-router']}, LiteLLM {v['litellm']} "
           f"(`litellm[proxy]`, 1 uvicorn worker), uvloop {v['uvloop']}, httptools {v['httptools']}.",
           f"* Pinning: {info['pinning']}. Every arm is up during every round.",
           "* Prompt counting: " + ("tokengate counts with the model's tokenizer (`--tokenizer`)."
                                    if a.get("tokengate_count") == "local" else
                                    "the fake worker reports no model path, so tokengate counts every prompt with a "
                                    "`/tokenize` call to it; the peers count nothing."),
           f"* Closed loop: rounds of {a['round_seconds']} s (paced; c=1: ≥ {a['min_round_requests']:g} request "
           f"durations) / {a['sat_seconds']} s (saturation) per arm after a {a['warmup_seconds']} s warm-up, "
           f"keep-alive connections; {a['rounds']} rounds, arm order rotated each round (A B C D, B C D A, …). "
           f"TTFT = send → first SSE event with content (non-streaming: first body byte). \"+\" = arm percentile "
           f"− direct percentile, pooled over rounds. Gateway CPU = utime+stime of the gateway's process tree over "
           f"its rounds (/proc/PID/stat; the ns-resolution /proc/PID/task/*/schedstat sum is in the JSON too). "
           f"\"CPU 0 foreign load\" = CPU 0 busy time (/proc/stat) not spent by any arm: other work on the "
           f"machine competing with the gateway. LiteLLM rounds stop after max(c, {a['litellm_requests']}) "
           f"requests and it is run up to c = {a['litellm_max_concurrency']} only.",
           f"* Open loop: Poisson arrivals at {a['sweep_start']:g} × {a['sweep_factor']:g}^k req/s, each step "
           f"{a['sweep_warmup']} s warm-up then ≥ {a['sweep_seconds']} s and ≥ {a['sweep_min_requests']} requests "
           f"on the warmed connections, direct first at each rate (it must hold too, with the client's send lag "
           f"p50 ≤ {a['max_lag_p50_ms']:g} ms). An arm holds a rate with ≥ 99.9 % success and p99 TTFT — from the "
           f"scheduled arrival, so queueing to connect counts — < direct's + {a['added_p99_ms']:g} ms; a failure "
           f"is retried {a['sweep_confirm']}× against a fresh reference (failures while other work used > "
           f"{a['max_foreign']:g} of CPU 0 or 1, and reference steps where the client stalled — send lag p99 > "
           f"{a['max_lag_p99_ms']:g} ms — are measured again, up to {a['contention_retries']}× more), then "
           f"{a['sweep_refine']} geometric bisection steps (downward when the first rate already fails).",
           f"* Raw per-request data and process logs: `{info['raw_dir']}/` (git-ignored).", ""]
    failed = {f"{arm} ({reg})": why for reg, st in res["arms"].items() for arm, why in st["failed"].items()}
    if failed:
        out += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in failed.items()), ""]
    out += ["## Headline (tokengate vs peers: latency as a difference, CPU and rates as a ratio)", "",
            *_headline(res, arms), ""]
    if res["fixed"]:
        out += ["## (a) Fixed concurrency, paced worker (20 ms to first token, 10 ms/token, 64 tokens); ms", "",
                *_fixed_table(res["fixed"]), ""]
    if res["saturation"]:
        out += ["## (b) Saturation: zero-delay worker, 16 tokens, closed loop", "",
                *_fixed_table(res["saturation"]), ""]
    if res["sweep"]:
        out += ["## (b) Open-loop Poisson sweep: highest rate held", "", *_sweep_table(res["sweep"]), ""]
    out += [f"Plots: `{info['name']}-ttft.png` (added TTFT and gateway CPU vs concurrency), "
            f"`{info['name']}-rate.png` (max sustained rate, saturation req/s).", ""]
    return "\n".join(out)


def _plot(json_path: Path, out_dir: Path, name: str, say: Callable[[str], None]) -> list[Path]:
    py = Path(sys.executable) if importlib.util.find_spec("matplotlib") else peers.venv_exe("plot", "python")
    if not py.exists():
        say("no matplotlib (python -m bench.peers install plot): plots skipped")
        return []
    script = Path(__file__).resolve().parent / "compare_plot.py"
    r = subprocess.run([str(py), str(script), str(json_path), str(out_dir), name], capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        say(f"plotting failed: {r.stderr[-2000:]}")
        return []
    return [Path(line) for line in r.stdout.split()]


def write_outputs(res: dict[str, Any], info: dict[str, Any], a: argparse.Namespace,
                  say: Callable[[str], None]) -> list[Path]:
    a.out.mkdir(parents=True, exist_ok=True)
    info["name"] = a.name
    info["settings"] = json.loads(json.dumps(info["settings"], default=str))
    jpath, mpath = a.out / f"{a.name}.json", a.out / f"{a.name}.md"
    jpath.write_text(json.dumps({"meta": info, **res}, indent=1) + "\n")
    text = render(res, info)
    mpath.write_text(text)
    print(text)
    written = [jpath, mpath]
    if a.plots:
        written += _plot(jpath, a.out, a.name, say)
    return written
