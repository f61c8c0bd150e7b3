"""deploy/prometheus checked by the real promtool: config and rules load, the unit tests in deploy/prometheus/tests
pass, and breaking a rule (syntax, or a threshold the unit tests pin) makes promtool fail.

promtool comes from Debian's ``prometheus`` package (2.42): scripts/install-system-deps.sh installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_grafana import known_metric_names, promql_metric_names

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = (PROM_DIR / "rules" / "recording.yml", PROM_DIR / "rules" / "alerts.yml")
README = ROOT / "deploy" / "README.md"
SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: run scripts/install-system-deps.sh (installs Debian's prometheus)")
    return path


def _run(promtool: str, *args: str | Path, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


def _rules(path: Path) -> list[dict[str, object]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, object]]:
    return _rules(PROM_DIR / "rules" / "alerts.yml")


def _copy_tree(tmp_path: Path) -> Path:
    dst = tmp_path / "prometheus"
    shutil.copytree(PROM_DIR, dst)
    return dst


def test_config_is_valid(promtool: str) -> None:
    result = _run(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_rules_are_valid(promtool: str) -> None:
    result = _run(promtool, "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    tests = sorted((PROM_DIR / "tests").glob("*.yml"))
    assert tests
    result = _run(promtool, "test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_broken_rule_is_rejected(promtool: str, tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    recording = tree / "rules" / "recording.yml"
    text = recording.read_text()
    broken = text.replace("(rate(tokengate_requests_total[5m]))", "(rate(tokengate_requests_total[5m])", 1)
    assert broken != text
    recording.write_text(broken)
    assert _run(promtool, "check", "rules", recording).returncode != 0
    assert _run(promtool, "check", "config", "prometheus.yml", cwd=tree).returncode != 0


def test_unit_tests_catch_a_loosened_headroom_threshold(promtool: str, tmp_path: Path) -> None:
    """With the KV-headroom guard gone the upgrade alert fires on a full cache: the unit tests must notice."""
    tree = _copy_tree(tmp_path)
    alerts = tree / "rules" / "alerts.yml"
    text = alerts.read_text()
    loosened = text.replace("region_preset_model:vllm_kv_cache_usage_perc:max < 0.8",
                            "region_preset_model:vllm_kv_cache_usage_perc:max < 1")
    assert loosened != text
    alerts.write_text(loosened)
    assert _run(promtool, "check", "rules", alerts).returncode == 0
    result = _run(promtool, "test", "rules", *sorted((tree / "tests").glob("*.yml")), cwd=tree)
    assert result.returncode != 0
    assert "KV cache full means scheduler-bound" in result.stdout + result.stderr


def test_recording_rules_follow_level_metric_operation() -> None:
    for rule in _rules(PROM_DIR / "rules" / "recording.yml"):
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", str(rule["record"])), rule["record"]
    names = {r["record"] for r in _rules(PROM_DIR / "rules" / "recording.yml")}
    for q in ("p50_5m", "p95_5m", "p99_5m"):
        assert f"region_preset_model:tokengate_time_to_first_token_seconds:{q}" in names
    assert {"region_preset_model:tokengate_output_tokens_per_second:p50_5m",
            "region_preset_model:tokengate_inter_token_latency_seconds:p95_5m",
            "region_preset_model:tokengate_requests:rate5m",
            "region_preset_model:tokengate_request_errors_per_requests:ratio_rate5m"} <= names


def test_rules_use_only_known_metrics() -> None:
    known = known_metric_names()
    for path in RULE_FILES:
        for rule in _rules(path):
            unknown = promql_metric_names(str(rule["expr"])) - known
            assert not unknown, f"{path.name} {rule.get('record') or rule.get('alert')}: unknown metrics {unknown}"


def test_every_alert_is_documented_and_unit_tested() -> None:
    readme = README.read_text().lower()
    tested = "\n".join(p.read_text() for p in (PROM_DIR / "tests").glob("*.yml"))
    for rule in _alerts():
        name = str(rule["alert"])
        labels = rule["labels"]
        annotations = rule["annotations"]
        assert isinstance(labels, dict) and labels.get("severity") in SEVERITIES, name
        assert isinstance(annotations, dict), name
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        anchor = str(annotations["runbook_url"]).split("#", 1)[1]
        assert anchor == name.lower() and f"### {name.lower()}" in readme, f"{name}: no runbook section in README"
        assert re.search(rf"alertname: {name}\b", tested), f"{name} has no promtool unit test"


def test_upgrade_advice_names_the_next_preset() -> None:
    (upgrade,) = [r for r in _alerts() if r["alert"] == "TokengateMoveToNextPreset"]
    (scheduler,) = [r for r in _alerts() if r["alert"] == "TokengateSchedulerBound"]
    assert "next_preset" in str(upgrade["annotations"])
    assert "multi-GPU won't save a bad scheduler" in str(scheduler["annotations"])
    assert "offset 30m" in (PROM_DIR / "rules" / "recording.yml").read_text()


def test_preset_ladder_names_real_presets() -> None:
    presets: set[str] = set()
    for path in (ROOT / "presets").glob("*.yaml"):
        for region in (yaml.safe_load(path.read_text()) or {}).get("regions", {}).values():
            presets.update(region.get("presets", {}))
    ladder = [r["labels"] for r in _rules(PROM_DIR / "rules" / "recording.yml")
              if r["record"] == "preset:tokengate_next_preset:info"]
    assert ladder
    for step in ladder:
        assert isinstance(step, dict)
        assert {step["preset"], step["next_preset"]} <= presets, f"{step}: not in presets/*.yaml ({sorted(presets)})"
