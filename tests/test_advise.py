"""app/advise.py and app/cli_advise.py: recorded metric series -> the verdict the capacity alerts would give.

Scenarios are Prometheus range-query answers (one series per signal, one point a minute) as ``tokengate advise
--prometheus`` collects them; the --metrics path is fed real expositions of the gateway's own metrics.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from app.advise import (
    Advice,
    Key,
    Signals,
    Verdict,
    advise_all,
    histogram_quantile,
    next_preset,
    signals_from_scrapes,
    signals_from_series,
)
from app.cli import main
from app.cli_advise import duration, parse_scrape, prometheus_queries
from app.metrics import GatewayMetrics, RequestRecord
from app.presets import Catalog, builtin_presets_dir, load_catalog
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway

ROOT = Path(__file__).resolve().parent.parent
RECORDING_RULES = ROOT / "deploy" / "prometheus" / "rules" / "recording.yml"
KEY: Key = ("fr", "h100-1x", "llama")
T0 = 1_800_000_000.0
FOR_15M = 900.0

Value = float | None | Callable[[int], float | None]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog([builtin_presets_dir()])


Series = dict[str, dict[tuple[str, ...], list[tuple[float, float]]]]


def recorded(signals: Mapping[str, Value], *, minutes: int = 30, key: Key = KEY) -> Series:
    """One point a minute for ``minutes``; a signal is a constant, a function of the minute, or None (absent)."""
    out: Series = {}
    for name, value in signals.items():
        labels = (key[0], key[2]) if name in ("clamp_ratio", "rejection_rate") else key  # per model x region
        points = []
        for m in range(minutes + 1):
            v = value(m) if callable(value) else value
            if v is not None:
                points.append((T0 + 60 * m, float(v)))
        out[name] = {labels: points}
    return out


HEALTHY: dict[str, Value] = {
    "ttft_p95": 0.4, "ttft_p95_ratio": 1.02, "tps_p50": 45.0, "tps_p50_ratio": 1.0, "request_rate": 12.0,
    "request_rate_ratio": 1.0, "kv_cache_usage": 0.45, "waiting": 0.0, "preemption_rate": 0.0, "clamp_ratio": 0.02,
    "rejection_rate": 0.0, "in_flight": 9.0,
}
# TTFT p95 up 1.5x at steady traffic, decode speed flat, KV cache with headroom: the alert's compute-bound pattern
COMPUTE_BOUND: dict[str, Value] = {**HEALTHY, "ttft_p95": 0.9, "ttft_p95_ratio": 1.5, "tps_p50_ratio": 0.95,
                                   "kv_cache_usage": 0.6}


def verdict_of(series: Series, catalog: Catalog, preset_override: str | None = None) -> Advice:
    (advice,) = advise_all(signals_from_series(series), catalog=catalog, for_s=FOR_15M, preset_override=preset_override)
    return advice


# --- scenarios ----------------------------------------------------------------------------------------------------

def test_healthy_stays(catalog: Catalog) -> None:
    a = verdict_of(recorded(HEALTHY), catalog)
    assert a.verdict is Verdict.STAY and a.next_preset is None


def test_compute_bound_for_20_minutes_moves_to_the_next_preset(catalog: Catalog) -> None:
    ratio = lambda m: 1.0 if m < 10 else 1.5  # noqa: E731 - TTFT rose 20 minutes ago
    a = verdict_of(recorded({**COMPUTE_BOUND, "ttft_p95_ratio": ratio}), catalog)
    assert a.verdict is Verdict.MOVE and a.next_preset == "h100-2x"
    assert a.sustained and a.held_for == 20 * 60
    assert any("compute-bound" in r for r in a.reasons)
    assert a.earliest.ttft_p95_ratio == 1.0 and a.latest.ttft_p95_ratio == 1.5


def test_compute_bound_for_5_minutes_is_only_watched(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "ttft_p95_ratio": lambda m: 1.5 if m >= 25 else 1.0}), catalog)
    assert a.verdict is Verdict.MOVE and not a.sustained and a.held_for == 300
    assert any("not yet act" in r for r in a.reasons)


def test_queueing_with_a_full_kv_cache_is_fixed_first(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "waiting": 14.0, "kv_cache_usage": 0.93}), catalog)
    assert a.verdict is Verdict.FIX_QUEUEING and a.next_preset is None
    assert any("14 requests waiting" in r and "93%" in r for r in a.reasons)


def test_preemptions_are_fixed_first(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "preemption_rate": 0.3}), catalog)
    assert a.verdict is Verdict.FIX_QUEUEING and any("preempting" in r for r in a.reasons)


def test_clamp_storm_is_fixed_first(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "clamp_ratio": 0.7}), catalog)
    assert a.verdict is Verdict.FIX_QUEUEING and any("hit the max_tokens cap" in r for r in a.reasons)


def test_another_region_s_clamps_are_not_this_one_s(catalog: Catalog) -> None:
    series = recorded({**COMPUTE_BOUND, "clamp_ratio": 0.0})
    other = recorded({"clamp_ratio": 0.9}, key=("uae", "h200-1x", KEY[2]))
    series["clamp_ratio"].update(other["clamp_ratio"])
    a = verdict_of(series, catalog)
    assert a.verdict is Verdict.MOVE, a.reasons


def test_waiting_with_kv_headroom_is_not_scheduler_bound(catalog: Catalog) -> None:
    # the alerts need both: requests waiting AND the KV cache at 80% or more
    a = verdict_of(recorded({**COMPUTE_BOUND, "waiting": 3.0, "kv_cache_usage": 0.5}), catalog)
    assert a.verdict is Verdict.MOVE


def test_traffic_growth_means_replicas(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "request_rate_ratio": 1.8}), catalog)
    assert a.verdict is Verdict.ADD_REPLICAS


def test_no_worker_metrics_no_move_advice(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "kv_cache_usage": None, "waiting": None, "preemption_rate": None}),
                   catalog)
    assert a.verdict is Verdict.STAY and any("no worker metrics" in r for r in a.reasons)


def test_decode_speed_improving_is_not_compute_bound(catalog: Catalog) -> None:
    a = verdict_of(recorded({**COMPUTE_BOUND, "tps_p50_ratio": 1.3}), catalog)
    assert a.verdict is Verdict.STAY


def test_top_of_the_ladder_says_so(catalog: Catalog) -> None:
    a = verdict_of(recorded(COMPUTE_BOUND, key=("fr", "h100-16x", "llama")), catalog)
    assert a.verdict is Verdict.MOVE and a.next_preset is None
    assert any("no larger preset" in r for r in a.reasons)


def test_external_workers_named_with_preset(catalog: Catalog) -> None:
    series = recorded(COMPUTE_BOUND, key=("uae", "external", "llama"))
    assert verdict_of(series, catalog).next_preset is None
    a = verdict_of(series, catalog, preset_override="h200-2x")
    assert (a.region, a.preset, a.next_preset) == ("uae", "h200-2x", "h200-4x")


def test_no_traffic_is_no_data(catalog: Catalog) -> None:
    a = verdict_of(recorded({"request_rate": 0.0, "in_flight": 0.0}), catalog)
    assert a.verdict is Verdict.NO_DATA


def test_cap_rejections_are_mentioned(catalog: Catalog) -> None:
    a = verdict_of(recorded({**HEALTHY, "rejection_rate": 2.0}), catalog)
    assert a.verdict is Verdict.STAY and any("cap rejections" in r for r in a.reasons)


def test_the_ladder_is_the_one_the_alert_names(catalog: Catalog) -> None:
    """preset:tokengate_next_preset:info in recording.yml and next_preset() agree on every step."""
    rules = [r for g in yaml.safe_load(RECORDING_RULES.read_text())["groups"] for r in g["rules"]
             if r.get("record") == "preset:tokengate_next_preset:info"]
    assert rules
    for rule in rules:
        labels = rule["labels"]
        assert next_preset(catalog, "fr", labels["preset"]) == labels["next_preset"], labels


# --- the math -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("q", "counts", "expected"), [
    (0.5, (0, 10, 10, 10), 1.5),  # interpolated inside (1, 2]
    (0.95, (5, 10, 10, 10), 1.9),
    (0.5, (10, 10, 10, 10), 0.5),  # the first bucket starts at 0
    (0.99, (0, 0, 0, 10), 4.0),  # in +Inf: the largest finite bound, as Prometheus answers
    (0.5, (0, 0, 0, 0), None),
])
def test_histogram_quantile_like_prometheus(q: float, counts: tuple[float, ...], expected: float | None) -> None:
    got = histogram_quantile(q, (1.0, 2.0, 4.0, float("inf")), counts)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_signals_from_two_scrapes_of_the_gateway() -> None:
    metrics = GatewayMetrics(CollectorRegistry())

    def requests(n: int, ttft: float, tps: float, *, max_tokens_clamped: bool = False, region: str = "fr",
                 preset: str = "h100-1x") -> None:
        for _ in range(n):
            rec = RequestRecord("chat", "llama", region, preset, f"{region}-0", 200, 0.0, 5.0, first_token=ttft,
                                last_token=ttft + 100 / tps, completion_tokens=101,
                                clamp=(region, preset, "max_tokens_cap") if max_tokens_clamped else None)
            metrics.observe_request(rec)

    vllm = ('# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{{model_name="llama",region="fr",'
            'preset="h100-1x",worker="fr-0"}} {kv}\n# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{{model_name="llama",region="fr",preset="h100-1x",worker="fr-0"}} {w}\n')
    requests(100, 0.08, 50.0)
    before = parse_scrape(generate_latest(metrics.registry).decode() + vllm.format(kv=0.4, w=0))
    requests(20, 0.6, 48.0, max_tokens_clamped=True)
    after = parse_scrape(generate_latest(metrics.registry).decode() + vllm.format(kv=0.97, w=6))
    created = min(v for (n, _), v in before.items() if n == "tokengate_requests_created")
    s = signals_from_scrapes(before, after, 10.0, created + 1000.0)[KEY]
    assert s.ttft_p95 is not None and 0.5 < s.ttft_p95 <= 0.75 and s.ttft_p95_ratio is not None
    assert s.ttft_p95_ratio > 5
    assert s.request_rate == 2.0 and s.request_rate_ratio == pytest.approx(2.0 / (100 / 990))
    assert (s.kv_cache_usage, s.waiting, s.clamp_ratio) == (0.97, 6.0, 1.0)
    (a,) = advise_all({KEY: [(0.0, s)]}, catalog=None, for_s=0)
    assert a.verdict is Verdict.FIX_QUEUEING
    # caps are per region: uae's clamps are not fr's, and a ratio never passes 1
    requests(20, 0.6, 48.0)
    requests(30, 0.6, 48.0, max_tokens_clamped=True, region="uae", preset="h200-1x")
    later = parse_scrape(generate_latest(metrics.registry).decode())
    signals = signals_from_scrapes(after, later, 10.0, created + 1010.0)
    assert signals[KEY].clamp_ratio == 0.0 and signals[("uae", "h200-1x", "llama")].clamp_ratio == 1.0


def test_queries_are_the_recording_rules_expressions() -> None:
    q = prometheus_queries(1800)
    rules = {r["record"]: " ".join(r["expr"].split()) for g in yaml.safe_load(RECORDING_RULES.read_text())["groups"]
             for r in g["rules"] if "record" in r}
    assert q["request_rate"] == rules["region_preset_model:tokengate_requests:rate5m"]
    assert q["in_flight"] == rules["region_preset_model:tokengate_requests_in_flight:sum"]
    assert "offset 1800s" in q["ttft_p95_ratio"] and set(q) == set(Signals.__dataclass_fields__)


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("45", 45)])
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


# --- the command against a real gateway ---------------------------------------------------------------------------

def test_advise_metrics_against_a_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedFakeWorker(model="tiny", ttft=0.01, token_delay=0.002, tokens=8) as w, \
            run_gateway(Settings(upstream=[w.url])) as gw:
        for _ in range(5):
            r = httpx.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": True})
            assert r.status_code == 200
        code = main(["advise", "--metrics", gw.url + "/metrics", "--interval", "0.5", "--json", "--preset",
                     "h100-1x"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    (a,) = out["advice"]
    assert (a["region"], a["preset"], a["model"]) == ("local", "h100-1x", "tiny")
    assert a["verdict"] in {v.value for v in Verdict}
    assert a["latest"]["kv_cache_usage"] == 0.0  # read from /metrics/workers
    assert a["latest"]["request_rate"] == 0.0 and a["latest"]["request_rate_ratio"] == 0.0


def test_advise_unreachable_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "--metrics", "http://127.0.0.1:9/metrics", "--interval", "1"]) == 3
    assert "cannot read metrics" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--interval", "0"], ["--interval", "100000000000s"], ["--window", "0s"],
                                  ["--window", "99999999999d"], ["--for=-5m"], ["--interval", "1e3"]])
def test_advise_durations_out_of_range_are_bad_input(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["advise", "--metrics", "http://127.0.0.1:9/metrics", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "out of range" in err or "not a duration" in err, err
    assert "Traceback" not in err


class _Answers:
    """A server that answers every GET with one body (what a wrong --prometheus or --metrics URL might be)."""

    def __init__(self, body: bytes, content_type: bytes = b"application/json") -> None:
        answer = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                self.send_response(200)
                self.send_header("content-type", content_type.decode())
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Answers:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize(("source", "body"), [
    ("--prometheus", b"[1, 2]"), ("--prometheus", b'{"status": "success", "data": 5}'),
    ("--prometheus", b"<html>no</html>"), ("--metrics", b"# TYPE up gauge\nup 1\n"),  # Prometheus' own /metrics
    ("--metrics", b"<html>\n"),
])
def test_advise_a_source_that_is_not_what_it_should_be_exits_3(source: str, body: bytes,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with _Answers(body) as srv:
        assert main(["advise", source, srv.url + ("/metrics" if source == "--metrics" else ""),
                     "--interval", "0.1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("tokengate advise: cannot read metrics: ") and "Traceback" not in err, err


def test_advise_metrics_takes_the_gateway_s_base_url_and_says_window_is_for_prometheus(
        capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedFakeWorker(model="tiny") as w, run_gateway(Settings(upstream=[w.url])) as gw:
        assert httpx.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 200
        assert main(["advise", "--metrics", gw.url, "--interval", "0.2", "--window", "10m"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(gw.url + "/metrics: two scrapes") and "--window 10 min is for --prometheus" in out
