"""deploy/k8s manifests: schema-valid for a pinned Kubernetes, and the house policies (non-root, limits, probes,
secrets by reference, GPUs = parallelism, every --upstream resolves).

Built-in kinds go through kubernetes-validate (strict: unknown fields are errors). It has no schema for CRDs: its CLI
only prints a WARN and exits 0 for them, so a broken ServiceMonitor would pass silently. The CRD kinds we ship are
listed in ``CRD_SCHEMAS`` and checked against minimal schemas here (the fields we use, typed, nothing else allowed);
the pod templates inside a LeaderWorkerSet are validated as real ``v1/PodTemplate`` objects. A kind that is neither
built in nor listed fails the test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"

Doc = dict[str, Any]

_STR = {"type": "string", "minLength": 1}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_NAME = {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}
_METADATA = {
    "type": "object", "required": ["name", "namespace"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
    "additionalProperties": False,
}
_RELABELINGS = {"type": "array", "items": {
    "type": "object", "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                            "uppercase", "keepequal", "dropequal"]},
        "sourceLabels": {"type": "array", "items": _LABEL_NAME},
        "separator": {"type": "string"},
        "targetLabel": _LABEL_NAME,
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "modulus": {"type": "integer", "minimum": 1},
    },
}}
_INT_OR_STR = {"type": ["integer", "string"]}

# monitoring.coreos.com/v1 ServiceMonitor: the subset of the operator's CRD that we use.
SERVICEMONITOR_SCHEMA: Doc = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": _STR,
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": _STR_MAP}},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STR}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {
                        "port": _STR, "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                        "relabelings": _RELABELINGS, "metricRelabelings": _RELABELINGS,
                    },
                }},
            },
        },
    },
}

# leaderworkerset.x-k8s.io/v1 LeaderWorkerSet: the subset we use; the pod templates are checked separately.
LEADERWORKERSET_SCHEMA: Doc = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"}, "kind": {"const": "LeaderWorkerSet"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "required": ["leaderWorkerTemplate"], "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object", "additionalProperties": False, "properties": {
                    "type": {"const": "RollingUpdate"},
                    "rollingUpdateConfiguration": {"type": "object", "additionalProperties": False, "properties": {
                        "maxUnavailable": _INT_OR_STR, "maxSurge": _INT_OR_STR}},
                }},
                "leaderWorkerTemplate": {
                    "type": "object", "required": ["workerTemplate"], "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
                        "leaderTemplate": {"type": "object", "required": ["spec"]},
                        "workerTemplate": {"type": "object", "required": ["spec"]},
                    },
                },
            },
        },
    },
}

CRD_SCHEMAS: dict[tuple[str, str], Doc] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_SCHEMA,
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LEADERWORKERSET_SCHEMA,
}


def load_docs(directory: Path = K8S_DIR) -> list[tuple[Path, Doc]]:
    out: list[tuple[Path, Doc]] = []
    for path in sorted(directory.glob("*.yaml")):
        out.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return out


def validate_manifest(doc: Doc) -> list[str]:
    """Every schema error of one manifest ("" path means the top), or [] when it is valid."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRD_SCHEMAS:
        validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        if key[1] == "LeaderWorkerSet" and not errors:
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for name in ("leaderTemplate", "workerTemplate"):
                if name in lwt:
                    pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                                    "metadata": {"name": f"{doc['metadata']['name']}-{name}"}, "template": lwt[name]}
                    errors += [f"spec.leaderWorkerTemplate.{name}.{e}" for e in validate_manifest(pod_template)]
        return errors
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [f"{exc.message}: add it to CRD_SCHEMAS with a schema, or use a built-in kind"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def _kubernetes_validate_cli(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "-k", KUBERNETES_VERSION, "--strict", *map(str, files)],
        capture_output=True, text=True, timeout=60,
    )


def _pod_specs(doc: Doc) -> Iterator[tuple[str, Doc]]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield name, doc["spec"]["template"]
    elif doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        for key in ("leaderTemplate", "workerTemplate"):
            if key in lwt:
                yield f"{name} {key}", lwt[key]


def _all_pod_templates() -> list[tuple[str, Doc]]:
    return [pt for _, doc in load_docs() for pt in _pod_specs(doc)]


def _find(kind: str, name: str) -> Doc:
    for _, doc in load_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {K8S_DIR}")


def _flag(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _gpus(container: Doc) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# --- schema -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path_doc", load_docs(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}/"
                         f"{pd[1]['metadata']['name']}")
def test_manifest_is_valid(path_doc: tuple[Path, Doc]) -> None:
    _, doc = path_doc
    assert validate_manifest(doc) == []


def test_kubernetes_validate_cli_passes_and_warns_only_for_listed_crds() -> None:
    files = sorted(K8S_DIR.glob("*.yaml"))
    result = _kubernetes_validate_cli(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    warned = set(re.findall(r"Couldn't find schema for kind (\S+) with api version (\S+)", result.stdout))
    assert warned == {(kind, api) for api, kind in CRD_SCHEMAS}, result.stdout
    assert "did not validate" not in result.stdout


def test_broken_builtin_manifest_is_rejected(tmp_path: Path) -> None:
    text = (K8S_DIR / "gateway.yaml").read_text()
    broken = text.replace("containerPort: 8080", 'containerPort: "eighty"', 1)
    assert broken != text
    (tmp_path / "gateway.yaml").write_text(broken)
    result = _kubernetes_validate_cli(tmp_path / "gateway.yaml")
    assert result.returncode != 0
    assert "did not validate for resource deployment/tokengate" in result.stdout
    # a misspelt field is caught too (strict schemas)
    typo = text.replace("readinessProbe:", "readynessProbe:", 1)
    docs = [d for d in yaml.safe_load_all(typo) if d and d["kind"] == "Deployment"]
    assert any("readynessProbe" in e for e in validate_manifest(docs[0]))


def test_broken_crds_are_rejected() -> None:
    sm = _find("ServiceMonitor", "vllm-workers")
    no_selector = {**sm, "spec": {k: v for k, v in sm["spec"].items() if k != "selector"}}
    assert any("'selector' is a required property" in e for e in validate_manifest(no_selector))
    bad_endpoint = {**sm, "spec": {**sm["spec"], "endpoints": [{**sm["spec"]["endpoints"][0], "intervall": "15s"}]}}
    assert validate_manifest(bad_endpoint)

    lws = _find("LeaderWorkerSet", "vllm-h100-16x")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    bad_size = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**lwt, "size": "two"}}}
    assert validate_manifest(bad_size)
    # a typo inside an embedded pod template is found by the real PodTemplate schema
    worker = yaml.safe_load(yaml.safe_dump(lwt["workerTemplate"]).replace("volumeMounts:", "volumeMount:"))
    bad_pod = {**lws, "spec": {**lws["spec"], "leaderWorkerTemplate": {**lwt, "workerTemplate": worker}}}
    assert any("workerTemplate" in e and "volumeMount" in e for e in validate_manifest(bad_pod))


def test_unknown_kind_is_not_silently_accepted() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert any("CRD_SCHEMAS" in e for e in validate_manifest(doc))


# --- policy -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name_template", _all_pod_templates(), ids=lambda nt: nt[0])
def test_pods_are_hardened_and_bounded(name_template: tuple[str, Doc]) -> None:
    name, template = name_template
    spec = template["spec"]
    assert spec["securityContext"].get("runAsNonRoot") is True, name
    assert spec["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    assert spec.get("automountServiceAccountToken") is False, name
    for c in spec["containers"]:
        where = f"{name} container {c['name']}"
        assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{where}: pin the image tag"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind} need cpu and memory"
        gpu_req = c["resources"]["requests"].get("nvidia.com/gpu")
        assert gpu_req == c["resources"]["limits"].get("nvidia.com/gpu"), f"{where}: GPU requests != limits"
        assert "livenessProbe" in c, where


def test_no_inline_secrets() -> None:
    secretish = re.compile(r"(^|[_-])(KEY|TOKEN|SECRET|PASSWORD)($|[_=-])", re.I)
    for path, doc in load_docs():
        assert doc["kind"] != "Secret", f"{path.name}: Secrets are created out of band, not committed"
    for name, template in _all_pod_templates():
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if secretish.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} must come from a Secret"
            assert not any(secretish.search(a) and "=" in a for a in c.get("args", []) if a.startswith("--")), name


def test_gateway_probes_hpa_and_pdb() -> None:
    deploy = _find("Deployment", "tokengate")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    hpa = _find("HorizontalPodAutoscaler", "tokengate")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tokengate"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "tokengate_requests_in_flight"
    assert hpa["spec"]["minReplicas"] >= 2
    for _, doc in load_docs():
        if doc["kind"] == "PodDisruptionBudget" and doc["metadata"]["name"] == "tokengate":
            assert doc["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
            break
    else:
        raise AssertionError("no PodDisruptionBudget for the gateway")


def test_workers_request_one_gpu_per_parallel_rank() -> None:
    seen = {}
    for _, doc in load_docs():
        if doc["kind"] == "StatefulSet":
            (c,) = doc["spec"]["template"]["spec"]["containers"]
            tp = int(_flag(c["args"], "--tensor-parallel-size") or 1)
            pp = int(_flag(c["args"], "--pipeline-parallel-size") or 1)
            assert _gpus(c) == tp * pp, doc["metadata"]["name"]
            seen[doc["metadata"]["labels"]["tokengate.io/preset"]] = _gpus(c)
        elif doc["kind"] == "LeaderWorkerSet":
            lwt = doc["spec"]["leaderWorkerTemplate"]
            (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
            (worker,) = lwt["workerTemplate"]["spec"]["containers"]
            script = " ".join(leader["args"])
            tp = int(re.search(r"--tensor-parallel-size[= ](\d+)", script).group(1))  # type: ignore[union-attr]
            pp = int(re.search(r"--pipeline-parallel-size[= ](\d+)", script).group(1))  # type: ignore[union-attr]
            assert "--distributed-executor-backend=ray" in script
            assert _gpus(leader) == _gpus(worker) == tp
            assert _gpus(leader) * lwt["size"] == tp * pp == 16
            seen[doc["metadata"]["labels"]["tokengate.io/preset"]] = tp * pp
    assert seen == {"h100-1x": 1, "h100-2x": 2, "h100-16x": 16}


def test_every_upstream_is_a_worker_pod() -> None:
    (c,) = _find("Deployment", "tokengate")["spec"]["template"]["spec"]["containers"]
    i = c["args"].index("--upstream")
    upstreams = [a for a in c["args"][i + 1:] if not a.startswith("--")]
    assert upstreams
    for url in upstreams:
        m = re.fullmatch(r"http://([a-z0-9-]+)-(\d+)\.([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", url)
        assert m, url
        sts_name, ordinal, svc_name, namespace, port = m.groups()
        sts = _find("StatefulSet", sts_name)
        assert sts["metadata"]["namespace"] == namespace and sts["spec"]["serviceName"] == svc_name, url
        assert int(ordinal) < sts["spec"]["replicas"], f"{url}: StatefulSet has {sts['spec']['replicas']} replicas"
        svc = _find("Service", svc_name)
        assert svc["spec"]["clusterIP"] == "None", f"{svc_name} must be headless for per-pod DNS"
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]], url


def test_servicemonitors_select_existing_services() -> None:
    services = [d for _, d in load_docs() if d["kind"] == "Service"]
    for _, sm in load_docs():
        if sm["kind"] != "ServiceMonitor":
            continue
        want = sm["spec"]["selector"]["matchLabels"].items()
        matched = [s for s in services if want <= s["metadata"].get("labels", {}).items()
                   and s["metadata"]["namespace"] in sm["spec"]["namespaceSelector"]["matchNames"]]
        assert matched, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for endpoint in sm["spec"]["endpoints"]:
            for s in matched:
                assert endpoint["port"] in [p["name"] for p in s["spec"]["ports"]], (sm["metadata"]["name"], s)

