"""Shared fixtures. The real CPU vLLM engine is started once per session — as soon as collection shows that an
``engine`` test will run, so it warms up (~30 s) while the unit tests run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.tinymodel import build_tiny_model
from app.workers.launch import EngineArgs, cpu_worker_spec, supports_explicit_abort, vllm_version

ENGINE_MODEL = "tiny-llama"
ENGINE_MAX_MODEL_LEN = 4096  # long answers (4000 tokens, ~10 s) make an abort unmistakable
ENGINE_STARTUP_TIMEOUT = 300.0


@dataclass
class Engine:
    url: str
    api_key: str
    model: str
    model_path: Path
    max_model_len: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}

    def tokenize(self, payload: dict[str, object]) -> int:
        r = httpx.post(self.url + "/tokenize", json={"model": self.model, **payload}, headers=self.headers,
                       timeout=30)
        r.raise_for_status()
        return int(r.json()["count"])


def deprioritise_engine_children(pid: int) -> None:
    """On 2 cores a generating CPU engine (its busy-polling EngineCore plus the worker) starves everything else,
    the engine's own API server included: a disconnect then goes unnoticed for seconds. Lower the priority of
    the engine's children so the API server, the gateway and the test stay responsive."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pending = [int(p) for p in children.read_text().split()] if children.exists() else []
    while pending:
        child = pending.pop()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, child, 10)
            for task in Path(f"/proc/{child}/task").iterdir():
                os.setpriority(os.PRIO_PROCESS, int(task.name), 10)
                kids = Path(f"/proc/{child}/task/{task.name}/children")
                pending += [int(p) for p in kids.read_text().split()]


class _EngineLauncher:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.error: str | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> None:
        if self.engine is not None or self.error is not None:
            return
        self._dir = tempfile.TemporaryDirectory(prefix="tokengate-engine-")
        root = Path(self._dir.name)
        model_path = build_tiny_model(root / "model")
        args = EngineArgs(model=str(model_path), served_model_name=ENGINE_MODEL, max_model_len=ENGINE_MAX_MODEL_LEN,
                          explicit_abort=supports_explicit_abort(vllm_version()))
        spec = cpu_worker_spec(args, name="test-engine", region="local", preset="cpu", log_dir=root / "logs")
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **spec.env}, start_new_session=True)
        self.engine = Engine(spec.url, spec.api_key, ENGINE_MODEL, model_path, ENGINE_MAX_MODEL_LEN, proc,
                             spec.log_path)

    def wait(self) -> Engine:
        self.start()
        assert self.engine is not None
        eng = self.engine
        deadline = time.monotonic() + ENGINE_STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if eng.proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(eng.url + "/health", timeout=2).status_code == 200:
                    deprioritise_engine_children(eng.proc.pid)
                    return eng
            time.sleep(0.5)
        tail = eng.log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the CPU vLLM engine did not become healthy; log tail:\n{tail}")

    def stop(self) -> None:
        eng = self.engine
        if eng is not None and eng.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(eng.proc.pid, signal.SIGTERM)
            try:
                eng.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(eng.proc.pid, signal.SIGKILL)
                eng.proc.wait(10)
        if self._dir is not None:
            self._dir.cleanup()


_launcher = _EngineLauncher()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("engine") for item in items):
        _launcher.start()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _launcher.stop()


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    yield _launcher.wait()
