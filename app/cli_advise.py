"""``tokengate advise``: is it time to move to a bigger preset? A verdict per region/preset/model from live numbers.

    tokengate advise [--prometheus URL | --metrics URL] [--window 30m] [--for 15m] [--interval 15s]
                     [--preset NAME] [--presets DIR]... [--json]

``--prometheus``: range queries over the last ``--window`` (the trend compares each point with ``--window`` before
it, as the alerts compare with 30 minutes before); a verdict must have held ``--for`` to be acted on.
``--metrics`` (default http://127.0.0.1:8080/metrics): two scrapes ``--interval`` apart of a gateway's /metrics and
its /metrics/workers; "now" is that interval, the trend baseline the gateway's lifetime before it. Workers the
gateway only proxies to are labelled preset "external": ``--preset`` names what they run. The decision itself is
app/advise.py. Exit status: 0 advice printed; 2 bad input; 3 the metrics source could not be read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .advise import (
    SIGNAL_NAMES,
    Advice,
    Key,
    Scrape,
    Signals,
    Verdict,
    advise_all,
    signals_from_scrapes,
    signals_from_series,
)
from .presets import Catalog, PresetError, builtin_presets_dir, load_catalog

EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3
DEFAULT_METRICS = "http://127.0.0.1:8080/metrics"
_BY = "region, preset, model"
_MODEL = '"model", "$1", "model_name", "(.+)"'  # vLLM names it model_name; the gateway's series say model
PER_POOL = frozenset({"clamp_ratio", "rejection_rate"})  # caps are per model x region pool: joined on those


class SourceError(Exception):
    """The metrics source answered, but not with what it should (exit 3, as when it can't be reached)."""


def duration(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``1h30m`` or plain seconds."""
    if re.fullmatch(r"\d{1,12}(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d{1,12})([smhd])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (like 90s, 15m, 1h)")
    return float(sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts))


def bounded(low: float, high: float, *, low_ok: bool = False) -> Any:
    """A ``duration`` within (``low``, ``high``] (``[low, high]`` with ``low_ok``)."""
    def parse(text: str) -> float:
        value = duration(text)
        if value > high or value < low or (value == low and not low_ok):
            side = "at least" if low_ok else "more than"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: {side} {low:g} s and at most {high:g} s")
        return value
    return parse


_WEEK = 7 * 86400.0


def metrics_url(url: str) -> str:
    """A gateway's base URL means its /metrics (the README's ``--metrics http://127.0.0.1:8080``)."""
    parts = httpx.URL(url)
    return str(parts.copy_with(path="/metrics")) if parts.path in ("", "/") else url


def add_advise_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "advise", help="is it time for a bigger preset? a verdict from live metrics",
        description="Is it time to move to a bigger preset? A verdict per region/preset/model (stay, fix caps or "
                    "queueing first, move to the next preset, add replicas) from TTFT p95 and tokens/s trends, "
                    "KV-cache usage, queue depth and cap hits, with the logic of the capacity alerts.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prometheus", metavar="URL", help="a Prometheus that scrapes the gateway")
    source.add_argument("--metrics", metavar="URL", help=f"a gateway's /metrics (default {DEFAULT_METRICS})")
    p.add_argument("--window", type=bounded(0, 90 * 86400.0), default=None, metavar="DURATION",
                   help="--prometheus: look back this far, and compare with this far before (default 30m); "
                        "--metrics compares with the gateway's lifetime instead")
    p.add_argument("--for", dest="for_s", type=bounded(0, 90 * 86400.0, low_ok=True), default=900.0,
                   metavar="DURATION",
                   help="--prometheus: how long a verdict must hold before acting on it (default 15m)")
    p.add_argument("--interval", type=bounded(0, _WEEK), default=15.0, metavar="DURATION",
                   help="--metrics: time between scrapes (default 15s)")
    p.add_argument("--preset", metavar="NAME", help="the preset the workers run, when the metrics say 'external'")
    p.add_argument("--presets", dest="preset_dirs", metavar="DIR", type=Path, action="append", default=[],
                   help="more preset directories, after the built-in one")
    p.add_argument("--timeout", type=duration, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_advise)


# --- Prometheus ---------------------------------------------------------------------------------------------------

def _quantile(q: float, metric: str, offset: str) -> str:
    return f"histogram_quantile({q}, sum by ({_BY}, le) (rate({metric}_bucket[5m]{offset})))"


def _requests(offset: str) -> str:
    return f"sum by ({_BY}) (rate(tokengate_requests_total[5m]{offset}))"


def prometheus_queries(offset_s: float) -> dict[str, str]:
    """PromQL per signal, from raw series (no recording rules needed), mirroring deploy/prometheus/rules."""
    off = f" offset {int(offset_s)}s"
    ttft = "tokengate_time_to_first_token_seconds"
    tps = "tokengate_output_tokens_per_second"
    return {
        "ttft_p95": _quantile(0.95, ttft, ""),
        "ttft_p95_ratio": f"{_quantile(0.95, ttft, '')} / {_quantile(0.95, ttft, off)}",
        "tps_p50": _quantile(0.5, tps, ""),
        "tps_p50_ratio": f"{_quantile(0.5, tps, '')} / {_quantile(0.5, tps, off)}",
        "request_rate": _requests(""),
        "request_rate_ratio": f"{_requests('')} / {_requests(off)}",
        "kv_cache_usage": f"max by ({_BY}) (label_replace(vllm:kv_cache_usage_perc, {_MODEL}))",
        "waiting": f"sum by ({_BY}) (label_replace(vllm:num_requests_waiting, {_MODEL}))",
        "preemption_rate": f"sum by ({_BY}) (label_replace(rate(vllm:num_preemptions_total[5m]), {_MODEL}))",
        "clamp_ratio": "sum by (region, model) (rate(tokengate_cap_clamps_total[5m])) "
                       "/ sum by (region, model) (rate(tokengate_requests_total[5m]))",
        "rejection_rate": "sum by (region, model) (rate(tokengate_cap_rejections_total[5m]))",
        "in_flight": f"sum by ({_BY}) (tokengate_requests_in_flight)",
    }


def query_prometheus(client: httpx.Client, base: str, window: float, now: float
                     ) -> dict[str, dict[tuple[str, ...], list[tuple[float, float]]]]:
    step = max(15.0, window / 120)
    out: dict[str, dict[tuple[str, ...], list[tuple[float, float]]]] = {}
    for name, expr in prometheus_queries(window).items():
        r = client.get(base.rstrip("/") + "/api/v1/query_range",
                       params={"query": expr, "start": now - window, "end": now, "step": step})
        try:
            body = r.json()
        except ValueError:
            raise SourceError(f"{base} is no Prometheus: its query API answered HTTP {r.status_code}, "
                              "not JSON") from None
        if not isinstance(body, dict):
            raise SourceError(f"{base} is no Prometheus: its query API answered {type(body).__name__}")
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused the {name} query: {str(body.get('error', r.text))[:200]}")
        per_pool = name in PER_POOL
        series = out.setdefault(name, {})
        try:
            for item in body["data"]["result"]:
                m = item["metric"]
                key = (m.get("region", ""), m.get("model", "")) if per_pool else (m.get("region", ""),
                                                                                   m.get("preset", ""),
                                                                                   m.get("model", ""))
                series[key] = [(float(t), float(v)) for t, v in item["values"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SourceError(f"{base} answered the {name} query with no range result ({exc!r})") from None
    return out


# --- a gateway's /metrics -----------------------------------------------------------------------------------------

def parse_scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_gateway(client: httpx.Client, url: str) -> Scrape:
    r = client.get(url)
    r.raise_for_status()
    try:
        samples = parse_scrape(r.text)
    except ValueError as exc:
        raise SourceError(f"{url} is not Prometheus text: {exc}") from None
    if not any(name.startswith("tokengate_") for name, _ in samples):
        raise SourceError(f"{url} has no tokengate_ metrics: not a tokengate gateway's /metrics")
    if url.rstrip("/").endswith("/metrics"):
        workers = client.get(url.rstrip("/") + "/workers")
        if workers.status_code == 200:
            samples.update(parse_scrape(workers.text))
    return samples


# --- output -------------------------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def _x(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def render_text(advice: Sequence[Advice], source: str) -> str:
    lines = [source, ""]
    if not advice:
        lines.append("no traffic through the gateway in the window: nothing to judge (verdict: stay)")
    for a in advice:
        verdict = a.verdict.value.upper()
        if a.verdict is Verdict.MOVE:
            verdict = f"MOVE TO {a.region}/{a.next_preset}" if a.next_preset else "MOVE TO A BIGGER PRESET"
        acting = a.verdict in (Verdict.MOVE, Verdict.FIX_QUEUEING, Verdict.ADD_REPLICAS)
        held = f"  (held {a.held_for / 60:.0f} min)" if acting and a.held_for else ""
        s, first = a.latest, a.earliest
        lines += [
            f"{a.region}/{a.preset}  {a.model}  ->  {verdict}{held}",
            f"  TTFT p95      {_fmt(s.ttft_p95, '.3f', ' s')}{_x(s.ttft_p95_ratio)}"
            f"   window start {_fmt(first.ttft_p95, '.3f', ' s')}",
            f"  tokens/s p50  {_fmt(s.tps_p50, '.1f')}{_x(s.tps_p50_ratio)}"
            f"   window start {_fmt(first.tps_p50, '.1f')}",
            f"  requests/s    {_fmt(s.request_rate, '.2f')}{_x(s.request_rate_ratio)}   in flight "
            f"{_fmt(s.in_flight, '.0f')}",
            f"  KV cache      {_fmt(s.kv_cache_usage, '.0%')} (max)   waiting {_fmt(s.waiting, '.0f')}   "
            f"preemptions {_fmt(s.preemption_rate, '.2f', '/s')}",
            f"  cap hits      clamped {_fmt(s.clamp_ratio, '.0%')} of requests   rejected "
            f"{_fmt(s.rejection_rate, '.2f', '/s')}",
            "  why: " + "; ".join(a.reasons),
            "",
        ]
    return "\n".join(lines).rstrip()


def advice_json(advice: Sequence[Advice]) -> list[dict[str, Any]]:
    out = []
    for a in advice:
        d = asdict(a)
        d["verdict"] = a.verdict.value
        d["latest"] = {k: getattr(a.latest, k) for k in SIGNAL_NAMES}
        d["earliest"] = {k: getattr(a.earliest, k) for k in SIGNAL_NAMES}
        out.append(d)
    return out


# --- the command --------------------------------------------------------------------------------------------------

def _catalog(dirs: Sequence[Path]) -> Catalog | None:
    builtin = builtin_presets_dir()
    try:
        return load_catalog(([builtin] if builtin.is_dir() else []) + list(dirs))
    except PresetError as exc:
        print(f"tokengate advise: warning: presets not loaded, next presets unnamed: {exc}", file=sys.stderr)
        return None


def collect(args: argparse.Namespace, client: httpx.Client) -> tuple[Mapping[Key, Sequence[tuple[float, Signals]]],
                                                                     float, str]:
    """The signals over time per region/preset/model, the ``for`` to apply, and a line naming the source."""
    if args.prometheus:
        window = 1800.0 if args.window is None else args.window
        now = time.time()
        series = signals_from_series(query_prometheus(client, args.prometheus, window, now))
        for_s = min(args.for_s, window)
        src = (f"Prometheus {args.prometheus}: last {window / 60:g} min, trend vs {window / 60:g} min "
               f"before; a verdict must hold {for_s / 60:g} min")
        return series, for_s, src
    url = metrics_url(args.metrics or DEFAULT_METRICS)
    before = scrape_gateway(client, url)
    started = time.monotonic()
    time.sleep(args.interval)
    after = scrape_gateway(client, url)
    now = time.time()
    signals = signals_from_scrapes(before, after, time.monotonic() - started, now)
    src = (f"{url}: two scrapes {args.interval:g} s apart, trend vs the gateway's lifetime before them; one short "
           "sample: confirm with --prometheus before acting")
    if args.window is not None:
        src += f" (--window {args.window / 60:g} min is for --prometheus: a /metrics scrape has no history)"
    return {k: [(now, s)] for k, s in signals.items()}, 0.0, src


def cmd_advise(args: argparse.Namespace) -> int:
    catalog = _catalog(args.preset_dirs)
    try:
        with httpx.Client(timeout=args.timeout) as client:
            series, for_s, source = collect(args, client)
    except (httpx.HTTPError, httpx.InvalidURL, OSError, SourceError) as exc:
        print(f"tokengate advise: cannot read metrics: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ValueError as exc:
        print(f"tokengate advise: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    advice = advise_all(series, catalog=catalog, for_s=for_s, preset_override=args.preset)
    if args.json:
        print(json.dumps({"source": source, "advice": advice_json(advice)}, indent=2))
    else:
        print(render_text(advice, source))
    return 0
