"""Side by side on one vLLM: client -> vLLM directly vs client -> tokengate gateway -> the same vLLM.

    python3 scripts/gpu_compare.py --direct http://127.0.0.1:8001 --gateway http://127.0.0.1:8080 \
        --model tiny-llama --concurrency 1,16,64 --rounds 3 --max-tokens 64 --out /tmp/out --label h100

Streaming chat completions with ``ignore_eos`` (every answer is exactly --max-tokens tokens), closed loop through
bench/loadclient.py.  Per concurrency: a warm-up of both arms, then --rounds rounds, each running both arms one
after the other, the order alternating (direct, gateway | gateway, direct | ...).  Per arm, pooled over rounds:
TTFT p50/p99 (send -> first content event), e2e p50, per-request decode rate ((tokens - 1) / (e2e - ttft), median),
aggregate output tokens/s (ok requests x tokens / round wall time, median over rounds) and errors; then the
gateway/direct ratios against the issue's targets (TTFT p50 ratio <= 1.02, output tokens/s ratio >= 0.98: reported,
never failed on).  Writes OUT/gpu_compare_LABEL.json (every round's summary and per-request timings) and
OUT/gpu_compare_LABEL.md (the table).  ``--also NAME=URL`` adds more gateway arms to the same rotation (another
configuration of tokengate in front of the same vLLM, e.g. ``poll=http://127.0.0.1:8081`` with --busy-poll), each
with its own ratios to direct.  Exit status 1 if any request failed (warm-up included), 2 if the
one-request sanity check fails (wrong model name, ignore_eos not honoured, ...).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.loadclient import Connection, RequestRecord, Target, chat_body, close_pool, percentile, run_closed, summarize

TTFT_P50_MAX = 1.02  # gateway/direct
TOKS_MIN = 0.98  # gateway/direct, per-request and aggregate output tokens/s
POOL_IDLE_S = 2.0  # drop an arm's keep-alive connections idle longer than this (uvicorn closes idle ones at 5 s)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def body_for(a: argparse.Namespace, *, stream: bool = True) -> dict[str, Any]:
    body = chat_body(max_tokens=a.max_tokens, stream=stream, model=a.model)
    body["ignore_eos"] = True
    return body


def http_json(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def sanity(a: argparse.Namespace, urls: dict[str, str]) -> dict[str, Any]:
    """One non-streaming request per arm: the model answers and honours ignore_eos (usage = max_tokens)."""
    out: dict[str, Any] = {}
    for arm, url in urls.items():
        try:
            got = http_json("POST", url.rstrip("/") + "/v1/chat/completions", body_for(a, stream=False), a.timeout)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            detail = exc.read()[:300].decode(errors="replace") if isinstance(exc, urllib.error.HTTPError) else ""
            print(f"sanity: {arm} {url} failed: {exc} {detail}", file=sys.stderr)
            raise SystemExit(2) from None
        tokens = (got.get("usage") or {}).get("completion_tokens")
        if tokens != a.max_tokens:
            print(f"sanity: {arm} answered {tokens} completion tokens, not {a.max_tokens} (ignore_eos ignored?)",
                  file=sys.stderr)
            raise SystemExit(2)
        out[arm] = {"completion_tokens": tokens, "finish_reason": got["choices"][0].get("finish_reason")}
    for arm, url in urls.items():  # informational only
        for path in ("/version", "/v1/models"):
            try:
                out.setdefault(f"{arm}_info", {})[path] = http_json("GET", url.rstrip("/") + path, timeout=5)
            except (OSError, urllib.error.URLError, ValueError) as exc:
                out.setdefault(f"{arm}_info", {})[path] = f"unavailable: {exc}"
    return out


def decode_rates(records: list[RequestRecord], tokens: int) -> list[float]:
    """Per-request output tokens/s after the first token."""
    return [(tokens - 1) / (r.e2e - r.ttft) for r in records if r.ok and r.ttft is not None and r.e2e > r.ttft]


def raw_records(records: list[RequestRecord]) -> list[list[Any]]:
    """[ttft_ms, e2e_ms, sse_events, status, error] per request, in completion order."""
    return [[None if r.ttft is None else round(r.ttft * 1000, 3), round(r.e2e * 1000, 3), r.chunks, r.status,
             r.error] for r in records]


class ArmState:
    def __init__(self, name: str, url: str, body: dict[str, Any], think: float = 0.0) -> None:
        self.name = name
        self.target = Target.build(url, body)
        self.pool: list[Connection] = []
        self.last_used = 0.0
        self.think = think

    async def run(self, concurrency: int, requests: int, timeout: float) -> tuple[list[RequestRecord], float]:
        if self.pool and time.monotonic() - self.last_used > POOL_IDLE_S:
            close_pool(self.pool)  # the server may be closing them right now: start clean instead of racing it
        res = await run_closed(self.target, concurrency=concurrency, requests=requests, timeout=timeout,
                               pool=self.pool, think=self.think)
        self.last_used = time.monotonic()
        return res.records, res.elapsed


def ratio(gw: float, direct: float) -> float:
    return gw / direct if direct > 0 and gw == gw and direct == direct else float("nan")


async def run_concurrency(a: argparse.Namespace, arms: dict[str, ArmState], c: int, say: Any) -> dict[str, Any]:
    n = a.requests_per_round or max(32, 4 * c)
    warm = a.warmup_requests or max(16, 2 * c)
    cell: dict[str, Any] = {"concurrency": c, "requests_per_round": n, "warmup_requests": warm,
                            "warmup": {}, "rounds": []}
    names = tuple(arms)
    for name in names:
        recs, elapsed = await arms[name].run(c, warm, a.timeout)
        s = summarize(recs, elapsed)
        cell["warmup"][name] = s
        say(f"  c={c} warm-up {name}: {s['ok']}/{s['requests']} ok, TTFT p50 {s['ttft_ms']['p50']:.1f} ms")
    pooled: dict[str, list[RequestRecord]] = {name: [] for name in names}
    agg: dict[str, list[float]] = {name: [] for name in names}
    for rnd in range(a.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for pos, name in enumerate(order):
            recs, elapsed = await arms[name].run(c, n, a.timeout)
            s = summarize(recs, elapsed)
            ok = s["ok"]
            agg_tps = ok * a.max_tokens / elapsed if elapsed > 0 else 0.0
            rates = decode_rates(recs, a.max_tokens)
            s.update({"arm": name, "round": rnd, "position": pos, "agg_tok_s": round(agg_tps, 2),
                      "decode_tok_s_p50": round(statistics.median(rates), 2) if rates else None,
                      "records": raw_records(recs)})
            cell["rounds"].append(s)
            pooled[name].extend(recs)
            agg[name].append(agg_tps)
            say(f"  c={c} round {rnd + 1}/{a.rounds} {name:7s}: {ok}/{s['requests']} ok, "
                f"TTFT p50 {s['ttft_ms']['p50']:.1f} ms, {agg_tps:.0f} tok/s, {s['elapsed_s']:.2f} s")
    stats: dict[str, Any] = {}
    for name in names:
        recs = pooled[name]
        ok = [r for r in recs if r.ok]
        ttft = sorted(r.ttft for r in ok if r.ttft is not None)
        e2e = sorted(r.e2e for r in ok)
        rates = decode_rates(recs, a.max_tokens)
        warm_err = cell["warmup"][name]["errors"]
        stats[name] = {
            "requests": len(recs), "ok": len(ok), "errors": len(recs) - len(ok), "warmup_errors": warm_err,
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 3), "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 3),
            "e2e_p50_ms": round(percentile(e2e, 50) * 1000, 3),
            "decode_tok_s_p50": round(statistics.median(rates), 3) if rates else float("nan"),
            "agg_tok_s_median": round(statistics.median(agg[name]), 3),
            "agg_tok_s_rounds": [round(x, 3) for x in agg[name]],
            "sse_events_mean": round(sum(r.chunks for r in ok) / len(ok), 2) if ok else 0.0,
        }
    cell["stats"] = stats
    cell["by_arm"] = {}
    for name in names[1:]:
        d, g = stats["direct"], stats[name]
        ratios = {
            "ttft_p50": ratio(g["ttft_p50_ms"], d["ttft_p50_ms"]),
            "ttft_p99": ratio(g["ttft_p99_ms"], d["ttft_p99_ms"]),
            "e2e_p50": ratio(g["e2e_p50_ms"], d["e2e_p50_ms"]),
            "decode_tok_s": ratio(g["decode_tok_s_p50"], d["decode_tok_s_p50"]),
            "agg_tok_s": ratio(g["agg_tok_s_median"], d["agg_tok_s_median"]),
        }
        cell["by_arm"][name] = {
            "ratios": {k: round(v, 4) for k, v in ratios.items()},
            "targets": {
                "ttft_p50_ratio_le_1.02": ratios["ttft_p50"] <= TTFT_P50_MAX,
                "decode_tok_s_ratio_ge_0.98": ratios["decode_tok_s"] >= TOKS_MIN,
                "agg_tok_s_ratio_ge_0.98": ratios["agg_tok_s"] >= TOKS_MIN,
            },
            "paired_ttft_p50_ms_median": paired_median(cell["rounds"], name),
        }
    cell["ratios"] = cell["by_arm"]["gateway"]["ratios"]  # the main gateway arm, as before --also
    cell["targets"] = cell["by_arm"]["gateway"]["targets"]
    return cell


def paired_median(rounds: list[dict[str, Any]], name: str) -> float | None:
    """Median over rounds of (this arm's TTFT p50 - the direct arm's in the same round), ms: the drift of the engine
    between rounds cancels out."""
    by_round: dict[int, dict[str, float]] = {}
    for s in rounds:
        by_round.setdefault(s["round"], {})[s["arm"]] = s["ttft_ms"]["p50"]
    diffs = [r[name] - r["direct"] for r in by_round.values() if name in r and "direct" in r
             and r[name] == r[name] and r["direct"] == r["direct"]]
    return round(statistics.median(diffs), 3) if diffs else None


def finite(x: Any) -> Any:
    """NaN (no successful request) as null, so the JSON stays strict."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def table(cells: list[dict[str, Any]], a: argparse.Namespace) -> str:
    names = list(cells[0]["by_arm"]) if cells else ["gateway"]
    head = ("| c | arm | TTFT p50 direct / gw (ms) | ratio | paired Δ p50 (ms) | TTFT p99 direct / gw (ms) | ratio "
            "| tok/s per req direct / gw | ratio | tok/s aggregate direct / gw | ratio | errors direct / gw |")
    lines = [head, "|" + "---|" * 12]
    for cell, name in ((cell, name) for cell in cells for name in names):
        d, g = cell["stats"]["direct"], cell["stats"][name]
        r, paired = cell["by_arm"][name]["ratios"], cell["by_arm"][name]["paired_ttft_p50_ms_median"]
        lines.append(
            f"| {cell['concurrency']} | {name} | {d['ttft_p50_ms']:.1f} / {g['ttft_p50_ms']:.1f} | {r['ttft_p50']:.3f} "
            f"| {'' if paired is None else f'{paired:+.2f}'} "
            f"| {d['ttft_p99_ms']:.1f} / {g['ttft_p99_ms']:.1f} | {r['ttft_p99']:.3f} "
            f"| {d['decode_tok_s_p50']:.1f} / {g['decode_tok_s_p50']:.1f} | {r['decode_tok_s']:.3f} "
            f"| {d['agg_tok_s_median']:.0f} / {g['agg_tok_s_median']:.0f} | {r['agg_tok_s']:.3f} "
            f"| {d['errors'] + d['warmup_errors']} / {g['errors'] + g['warmup_errors']} |")
    lines += ["", f"Targets (issue): TTFT p50 ratio <= {TTFT_P50_MAX}, output tokens/s ratio >= {TOKS_MIN} "
              "(per request and aggregate).", ""]
    for cell, name in ((cell, name) for cell in cells for name in names):
        r, t = cell["by_arm"][name]["ratios"], cell["by_arm"][name]["targets"]
        lines.append(f"- c={cell['concurrency']} {name}: TTFT p50 ratio {r['ttft_p50']:.3f} "
                     f"{met(t['ttft_p50_ratio_le_1.02'])}; tok/s per request ratio {r['decode_tok_s']:.3f} "
                     f"{met(t['decode_tok_s_ratio_ge_0.98'])}; tok/s aggregate ratio {r['agg_tok_s']:.3f} "
                     f"{met(t['agg_tok_s_ratio_ge_0.98'])}")
    lines += ["", f"{a.label}: model {a.model}, streaming chat, max_tokens {a.max_tokens} with ignore_eos, "
              f"{a.rounds} interleaved rounds per concurrency (order alternating), closed loop; TTFT and e2e pooled "
              "over rounds, tok/s per request = median of (tokens - 1) / (e2e - TTFT), aggregate = median over "
              "rounds of tokens / round wall time; errors include warm-up."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direct", required=True, help="vLLM base URL, e.g. http://127.0.0.1:8001")
    p.add_argument("--gateway", required=True, help="tokengate base URL in front of the same vLLM")
    p.add_argument("--also", action="append", default=[], metavar="NAME=URL",
                   help="another gateway arm in the same rotation (repeatable), e.g. poll=http://127.0.0.1:8081")
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated closed-loop concurrencies")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests-per-round", type=int, default=0, help="per arm per round (default max(32, 4*c))")
    p.add_argument("--warmup-requests", type=int, default=0, help="per arm per concurrency (default max(16, 2*c))")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="each stream waits a random 0..T ms before each request (same draws for both arms): streams "
                        "of equal length otherwise restart in lock-step waves, whose TTFT swings with the engine's "
                        "scheduling from round to round")
    p.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--label", default=socket.gethostname(), help="e.g. the card: h100, h200")
    a = p.parse_args(argv)
    if a.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (the decode rate needs tokens after the first)")
    concs = [int(x) for x in a.concurrency.split(",") if x.strip()]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", a.label) or "run"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    urls = {"direct": a.direct, "gateway": a.gateway}
    for item in a.also:
        name, sep, url = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in urls or not url:
            p.error(f"--also {item!r}: want NAME=URL with a new NAME of letters, digits, - and _")
        urls[name] = url

    def say(msg: str) -> None:
        print(msg, flush=True)

    say(f"gpu_compare {label}: {', '.join(f'{k} {v}' for k, v in urls.items())}, model {a.model}, c={concs}, "
        f"{a.rounds} rounds, max_tokens {a.max_tokens}, think 0..{a.think_ms:g} ms")
    checked = sanity(a, urls)
    say(f"sanity ok: {a.max_tokens} completion tokens on every arm")
    body = body_for(a)
    arms = {name: ArmState(name, url, body, a.think_ms / 1000) for name, url in urls.items()}

    async def go() -> list[dict[str, Any]]:
        cells = []
        for c in concs:
            cells.append(await run_concurrency(a, arms, c, say))
        for arm in arms.values():
            close_pool(arm.pool)
        return cells

    import uvloop

    t0 = time.time()
    cells = uvloop.run(go())
    md = table(cells, a)
    print()
    print(md, end="")
    result = {
        "label": label, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "duration_s": round(time.time() - t0, 1), "args": vars(a), "urls": urls, "host": platform.node(),
        "python": sys.version.split()[0], "body": body, "sanity": checked,
        "targets": {"ttft_p50_ratio_max": TTFT_P50_MAX, "tok_s_ratio_min": TOKS_MIN},
        "records_format": "[ttft_ms, e2e_ms, sse_events, status, error]", "cells": cells,
    }
    (out / f"gpu_compare_{label}.json").write_text(json.dumps(finite(result), indent=1, allow_nan=False) + "\n")
    (out / f"gpu_compare_{label}.md").write_text(f"# gateway vs direct vLLM: {label}\n\n" + md)
    say(f"wrote {out / f'gpu_compare_{label}.json'} and .md")
    failed = sum(s["errors"] + s["warmup_errors"] for cell in cells for s in cell["stats"].values())
    if failed:
        kinds: dict[str, int] = {}
        for cell in cells:
            for s in [*cell["warmup"].values(), *cell["rounds"]]:
                for k, v in s["error_kinds"].items():
                    kinds[k] = kinds.get(k, 0) + v
        say(f"FAILED: {failed} requests failed: {kinds}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
