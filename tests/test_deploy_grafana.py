"""deploy/grafana: the dashboard's structure, and that every PromQL it runs names a metric that exists — one the
gateway exports (read from app.metrics itself), a vLLM worker metric, or a recording rule of recording.yml.

``dashboard_exprs(path)`` is the helper other tests import to evaluate each panel query against a real Prometheus;
``promql_metric_names(expr)`` and ``known_metric_names()`` are shared with tests/test_deploy_prometheus.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from app.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "tokengate.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "tokengate.yml"
RECORDING_RULES = ROOT / "deploy" / "prometheus" / "rules" / "recording.yml"

# vLLM 0.32 worker metrics the artefacts may use (histograms expand to _bucket/_sum/_count).
VLLM_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")
VLLM_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
               "vllm:num_preemptions_total")
# Series Prometheus itself makes.
PROMETHEUS_BUILTINS = ("up", "ALERTS")

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "info": ("_info",), "summary": ("", "_sum", "_count", "_created")}

# What Grafana substitutes before a query reaches Prometheus; "All" of a multi-value variable is allValue ".*".
_GRAFANA_VARS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


def gateway_metric_names() -> set[str]:
    names: set[str] = set()
    for family in GatewayMetrics(CollectorRegistry()).registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def recording_rule_names(path: Path = RECORDING_RULES) -> set[str]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def known_metric_names() -> set[str]:
    vllm = {h + s for h in VLLM_HISTOGRAMS for s in ("_bucket", "_sum", "_count")} | set(VLLM_SERIES)
    return gateway_metric_names() | vllm | recording_rule_names() | set(PROMETHEUS_BUILTINS)


_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
             "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects. A small lexer, not a parser: enough for our own queries."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", s):
        if m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def _substitute(expr: str, variables: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return variables.get(name, m.group(0))
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs(path: Path = DASHBOARD, *, substitute: bool = True) -> list[str]:
    """Every panel query of the dashboard, in panel order. With ``substitute`` (the default) Grafana's variables are
    replaced as Grafana would with "All" selected ($region/$preset/$model -> .*, $__rate_interval -> 5m), so each
    string is plain PromQL that a Prometheus can evaluate."""
    dashboard = load_dashboard(path)
    variables = dict(_GRAFANA_VARS)
    variables.update({v["name"]: v.get("allValue") or ".*" for v in dashboard["templating"]["list"]})
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    return [_substitute(e, variables) for e in exprs] if substitute else exprs


def _provisioned_uid() -> str:
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    uid: str = ds["uid"]
    return uid


# --- the lexer first: the metric check below is only as good as it ------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.95, sum by (region, le) (rate(a_bucket{le!="x",b=~"$r"}[5m])))', {"a_bucket"}),
    ("rate(vllm:num_preemptions_total[5m]) / ignoring(le) b offset 30m > 1.3", {"vllm:num_preemptions_total", "b"}),
    ('sum(x) by (phase) * on (preset) group_left (next_preset) y or vector(1)', {"x", "y"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") unless bool 2e3', {"up"}),
    ("max_over_time(deriv(c[10m:1m])[1h:]) - 1.5e-3 * -d", {"c", "d"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_known_names_come_from_the_gateway() -> None:
    names = gateway_metric_names()
    assert {"tokengate_requests_total", "tokengate_time_to_first_token_seconds_bucket", "tokengate_worker_up",
            "tokengate_requests_in_flight", "tokengate_build_info"} <= names
    assert "tokengate_requests" not in names  # counters are only exposed with _total


# --- the dashboard ------------------------------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"region", "preset", "model"} <= set(names)
    uid = _provisioned_uid()
    for v in dashboard["templating"]["list"]:
        assert v["datasource"]["uid"] == uid, v["name"]
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, p["title"]


def test_dashboard_covers_the_contract() -> None:
    raw = "\n".join(dashboard_exprs(substitute=False))
    for needle in ("tokengate_time_to_first_token_seconds:p50_5m", "tokengate_time_to_first_token_seconds:p95_5m",
                   "tokengate_time_to_first_token_seconds:p99_5m", "tokengate_output_tokens_per_second",
                   "tokengate_inter_token_latency_seconds", "tokengate_e2e_latency_seconds",
                   "tokengate_requests_in_flight", "vllm:num_requests_waiting", "tokengate_queue_time_seconds",
                   "tokengate_completion_tokens", "tokengate_upstream_errors_total", "tokengate_cap_clamps",
                   "tokengate_cap_rejections", "tokengate_worker_up", "tokengate_worker_restarts_total",
                   'phase="dispatch"', 'phase="relay"', "vllm:time_to_first_token_seconds"):
        assert needle in raw, f"no panel shows {needle}"
    for var in ("$region", "$preset", "$model"):
        assert var in raw, f"variable {var} is never used"


def test_dashboard_uses_only_known_metrics() -> None:
    known = known_metric_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    unknown = {name: e for e in exprs for name in promql_metric_names(e) if name not in known}
    assert not unknown, f"metrics neither exported, vllm: nor recorded: {unknown}"
    dashboard = load_dashboard()
    for annotation in dashboard["annotations"]["list"]:
        assert promql_metric_names(annotation["expr"]) <= known, annotation["name"]
    for var in dashboard["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m and promql_metric_names(m.group(1)) <= known, var["name"]


def test_unknown_metric_is_caught(tmp_path: Path) -> None:
    dashboard = load_dashboard()
    target = next(p for p in dashboard["panels"] if p["type"] != "row")["targets"][0]
    target["expr"] = target["expr"].replace("tokengate_time_to_first_token_seconds", "tokengate_ttft_seconds")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(dashboard))
    known = known_metric_names()
    assert any(n not in known for e in dashboard_exprs(broken) for n in promql_metric_names(e))


def test_dashboard_exprs_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule): a syntax error anywhere fails here, not in Grafana."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: run scripts/install-system-deps.sh (installs Debian's prometheus)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}:check", "expr": e} for i, e in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:broken:check", "expr": dashboard_exprs()[0] + ")"}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


def test_provisioning_points_at_the_dashboard() -> None:
    (ds,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"] and ds["url"].startswith("http")
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    assert yaml.safe_load(PROVIDERS.read_text())["apiVersion"] == 1
