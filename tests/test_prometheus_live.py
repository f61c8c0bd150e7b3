"""A real Prometheus (Debian's) scraping a gateway in front of the real CPU vLLM engine, with deploy/prometheus's
own scrape jobs and rules at a 1 s interval: the histograms and recording rules have values, every Grafana panel
query evaluates, and ``tokengate advise --prometheus`` reads it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.cli import main
from app.settings import Settings
from app.workers.launch import free_port

from .conftest import Engine
from .test_deploy_grafana import dashboard_exprs
from .utils import RunningGateway, run_gateway, wait_until

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
HELLO = [{"role": "user", "content": "Hello world, say ok!"}]


@dataclass
class Live:
    gateway: RunningGateway
    prometheus: str
    model: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(self.prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {r.status_code} {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def values(self, expr: str) -> list[float]:
        return [float(item["value"][1]) for item in self.query(expr)]


def _config(tmp: Path, target: str) -> Path:
    """deploy/prometheus/prometheus.yml with its rules, pointed at ``target`` and scraping every second."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [target]
    shutil.copytree(PROM_DIR / "rules", tmp / "rules")
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def live(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: run scripts/install-system-deps.sh (installs Debian's prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    settings = Settings(upstream=[engine.url], upstream_api_key=engine.api_key, max_tokens_cap=32)
    with run_gateway(settings) as gw:
        port = free_port()
        config = _config(tmp, gw.url.split("://")[1])
        with open(tmp / "prometheus.log", "wb") as log:
            proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: httpx.get(url + "/-/ready").status_code == 200, 30, "prometheus ready")
            result = Live(gw, url, engine.model)
            # target discovery takes a few seconds: traffic before the first scrape would show no increase
            wait_until(lambda: len(result.query('up{job=~"tokengate|vllm-workers"} == 1')) == 2, 30, "first scrapes")
            _traffic(gw, engine.model)
            # rates need two scrapes of the traffic, the rules an evaluation after them
            wait_until(lambda: result.values("sum(tokengate_requests_total)") == [24.0], 30, "the last scrape")
            for rule in ("region_preset_model:tokengate_time_to_first_token_seconds:p50_5m",
                         "region_preset_model:tokengate_output_tokens_per_second:p50_5m",
                         "region_preset_model:vllm_kv_cache_usage_perc:max"):
                wait_until(lambda rule=rule: _finite(result.values(rule)), 30, rule)
            yield result
        finally:
            proc.terminate()
            proc.wait(20)
            if proc.returncode not in (0, -15):
                print((tmp / "prometheus.log").read_text()[-3000:])


def _finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


def _traffic(gw: RunningGateway, model: str) -> None:
    """Three rounds a second or more apart (so rates see increases between scrapes): streamed (24 tokens: long
    enough to arrive in several chunks, which tokens/s needs), plain and clamped chat requests, four at a time."""
    def chat(i: int) -> int:
        stream = i % 2 == 0
        body: dict[str, Any] = {"model": model, "messages": HELLO, "stream": stream, "ignore_eos": True,
                                "max_tokens": 24 if stream else 64 if i % 4 == 3 else 8}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            started = time.monotonic()
            assert set(pool.map(chat, range(8))) == {200}
            time.sleep(max(0.0, 1.5 - (time.monotonic() - started)))


def test_targets_are_up(live: Live) -> None:
    up = {item["metric"]["job"]: float(item["value"][1]) for item in live.query('up{job=~"tokengate|vllm-workers"}')}
    assert up == {"tokengate": 1.0, "vllm-workers": 1.0}


def test_histograms_and_recording_rules_have_values(live: Live) -> None:
    m = f'{{model="{live.model}"}}'
    assert sum(live.values(f"tokengate_time_to_first_token_seconds_count{m}")) == 12  # the streamed ones
    assert sum(live.values(f"tokengate_requests_total{m}")) == 24
    for rule in ("region_preset_model:tokengate_time_to_first_token_seconds:p50_5m",
                 "region_preset_model:tokengate_time_to_first_token_seconds:p95_5m",
                 "region_preset_model:tokengate_output_tokens_per_second:p50_5m",
                 "region_preset_model:tokengate_e2e_latency_seconds:p95_5m",
                 "region_preset_model:tokengate_requests:rate5m",
                 "region_preset_model:tokengate_completion_tokens:rate5m",
                 "model:tokengate_cap_clamps_per_requests:ratio_rate5m",
                 "region_model:tokengate_cap_clamps_per_requests:ratio_rate5m",
                 "region_preset_model:vllm_generation_tokens:rate5m",
                 "region_preset_model:vllm_time_to_first_token_seconds:p95_5m"):
        values = live.values(rule + m)
        assert values and all(math.isfinite(v) and v > 0 for v in values), (rule, values)
    assert live.values("region_preset_model:tokengate_request_errors_per_requests:ratio_rate5m" + m) == [0.0]
    # worker series join the gateway's on (region, preset, model): the model_name relabel and our worker labels
    joined = live.query("region_preset_model:vllm_kv_cache_usage_perc:max and on (region, preset, model) "
                        "region_preset_model:tokengate_requests:rate5m")
    assert [(j["metric"]["region"], j["metric"]["preset"]) for j in joined] == [("local", "external")]
    assert live.values("count(preset:tokengate_next_preset:info)") == [7]


def test_every_grafana_panel_query_evaluates(live: Live) -> None:
    exprs = dashboard_exprs()
    empty = [e for e in exprs if not live.query(e)]
    # with 24 requests and no errors, queueing, restarts or 30 minutes of history, some panels are rightly empty;
    # most must show data
    assert len(empty) <= len(exprs) // 3, "panels with no data:\n" + "\n".join(empty)


def test_advise_reads_this_prometheus(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advise", "--prometheus", live.prometheus, "--window", "5m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (advice,) = out["advice"]
    assert (advice["region"], advice["preset"], advice["model"]) == ("local", "external", live.model)
    latest = advice["latest"]
    assert latest["ttft_p95"] > 0 and latest["request_rate"] > 0 and latest["kv_cache_usage"] is not None
    # 6 clamped in 24: rate() extrapolates each series from its own first scrape, so the ratio of two rates over
    # a window that holds only three rounds of traffic is near, not at, the ratio of the counts
    assert latest["clamp_ratio"] == pytest.approx(0.25, abs=0.1)
    assert advice["verdict"] == "stay"  # no 5-minute-old baseline to compare with yet
