"""Peer gateways for ``bench/compare.py``: their venvs, versions and launch commands.

Each peer lives in its own venv under ``bench/.venvs/`` (gitignored) so its dependencies never touch the project's
``.venv``:

    python -m bench.peers install            # litellm[proxy], vllm-router and matplotlib, pinned below
    python -m bench.peers install litellm    # one of them
    python -m bench.peers versions

Launch set-ups (the ones measured before on this machine, see bench/NOTES.md):

* tokengate:   ``tokengate serve --upstream URL --port P --log-level warning`` (the project venv's entry point)
* vllm-router: ``vllm-router --host 127.0.0.1 --port P --worker-urls URL --policy round_robin --prometheus-port Q``
               (it health-checks the worker's ``/health`` before it listens); ready on ``GET /health``
* LiteLLM:     ``litellm --config cfg.yaml --num_workers 1`` with callbacks, spend logs and telemetry off, no
               database and no master key; one ``model_list`` entry per fake worker (model name = worker's model),
               so one process serves every regime; ready on ``GET /health/liveliness`` (``/health`` calls models)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
PINS = {
    "litellm": "litellm[proxy]==1.108.7",
    "vllm-router": "vllm-router==0.1.17",
    "plot": "matplotlib",
}
DISTS = {"litellm": "litellm", "vllm-router": "vllm-router", "plot": "matplotlib"}
# env that would switch LiteLLM's database, cache or callbacks on if inherited from the shell
_LITELLM_DROP_ENV = ("DATABASE_URL", "DIRECT_URL", "REDIS_HOST", "REDIS_URL", "REDIS_PORT", "REDIS_PASSWORD",
                     "LITELLM_MASTER_KEY", "LITELLM_LOG", "STORE_MODEL_IN_DB", "OPENAI_API_KEY", "OPENAI_BASE_URL")


def venv_dir(name: str) -> Path:
    return VENVS / name


def venv_exe(name: str, exe: str) -> Path:
    return venv_dir(name) / "bin" / exe


def install(name: str, spec: str | None = None) -> Path:
    """Create ``bench/.venvs/NAME`` and pip-install the peer into it (idempotent)."""
    d = venv_dir(name)
    if not (d / "bin" / "python").exists():
        # the base interpreter, not the project venv's site-packages
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(d)], check=True)
    subprocess.run([str(d / "bin" / "python"), "-m", "pip", "install", "-q", spec or PINS[name]], check=True)
    return d


def version(name: str) -> str | None:
    py = venv_exe(name, "python")
    if not py.exists():
        return None
    try:
        out = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({DISTS[name]!r}))"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@dataclass
class Launch:
    cmd: list[str]
    ready_path: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    cwd: Path | None = None


class PeerUnavailable(RuntimeError):
    pass


def tokengate(port: int, upstream: str, extra: list[str] | None = None, src: Path | None = None) -> Launch:
    """The project venv's ``tokengate``; with ``src``, the ``app`` package in that directory instead (see
    ``export_tokengate``), run by the same interpreter."""
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--upstream", upstream, "--log-level", "warning",
            *(extra or [])]
    if src is not None:
        env = dict(os.environ, PYTHONPATH=str(src))
        return Launch([sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", *args],
                      "/readyz", env, src)
    exe = Path(sys.prefix) / "bin" / "tokengate"
    if not exe.exists():
        raise PeerUnavailable(f"{exe} not found (run from the project venv: `make run` / pip install -e .)")
    return Launch([str(exe), *args], "/readyz")


def export_tokengate(rev: str, dest: Path) -> Path:
    """``app/`` and ``presets/`` as of git revision ``rev`` into ``dest`` (to measure a commit, not the working tree,
    without touching the checkout)."""
    repo = BENCH.parent
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "app", "presets"], cwd=repo, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def vllm_router(port: int, upstream: str, prometheus_port: int) -> Launch:
    exe = venv_exe("vllm-router", "vllm-router")
    if not exe.exists():
        raise PeerUnavailable(f"{exe} not found: python -m bench.peers install vllm-router")
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream,
           "--policy", "round_robin", "--prometheus-port", str(prometheus_port), "--log-level", "warning"]
    return Launch(cmd, "/health")


def litellm(port: int, models: dict[str, str], workdir: Path) -> Launch:
    """One LiteLLM proxy; ``models`` maps model name -> worker base URL (``http://127.0.0.1:W``)."""
    exe = venv_exe("litellm", "litellm")
    if not exe.exists():
        raise PeerUnavailable(f"{exe} not found: python -m bench.peers install litellm")
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ["model_list:"]
    for name, url in models.items():
        lines += [f"  - model_name: {name}",
                  f"    litellm_params: {{model: openai/{name}, api_base: \"{url}/v1\", api_key: x}}"]
    lines += ["litellm_settings: {drop_params: true, callbacks: []}",
              "general_settings: {disable_spend_logs: true}"]
    cfg = workdir / "litellm.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in _LITELLM_DROP_ENV}
    # LITELLM_LOG=WARNING also sets uvicorn's log level, so no access line per request (the other arms log at
    # warning too); unset, LiteLLM's handler defaults to DEBUG and uvicorn logs every request
    env.update(LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true", LITELLM_TELEMETRY="False",
               LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="WARNING")
    cmd = [str(exe), "--config", str(cfg), "--num_workers", "1", "--host", "127.0.0.1", "--port", str(port)]
    return Launch(cmd, "/health/liveliness", env, workdir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Peer gateway venvs for bench/compare.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install")
    i.add_argument("names", nargs="*", default=list(PINS), choices=list(PINS))
    sub.add_parser("versions")
    a = p.parse_args(argv)
    if a.cmd == "install":
        for name in a.names or list(PINS):
            print(f"installing {PINS[name]} into {venv_dir(name)}", flush=True)
            install(name)
    for name in PINS:
        print(f"{name:12s} {version(name) or 'not installed'}")


if __name__ == "__main__":
    main()
