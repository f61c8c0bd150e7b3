"""Launches, watches, restarts and stops managed vLLM worker processes. Never imported by request code.

Each worker runs in its own process group (its engine children too) and is told to die with the gateway
(``PR_SET_PDEATHSIG``), so no worker outlives us even when we are killed with SIGKILL.  A worker that exits is
restarted after a backoff that doubles from ``backoff_base`` to ``backoff_max`` and resets once it stayed up
for ``healthy_after`` seconds; while it is down it is out of rotation (the health checker sees it fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import GatewayMetrics
from .registry import Registry, Worker

log = logging.getLogger("tokengate.supervisor")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    name: str
    region: str
    preset: str
    argv: tuple[str, ...]
    env: dict[str, str]
    port: int
    api_key: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(slots=True)
class _Managed:
    spec: WorkerSpec
    worker: Worker
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures_in_row: int = 0
    stopping: bool = False
    exits: list[int] = field(default_factory=list)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # pragma: no cover - not Linux
        pass


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec], registry: Registry, metrics: GatewayMetrics, *,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, healthy_after: float = 60.0,
                 stop_timeout: float = 20.0, on_start: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.healthy_after = healthy_after
        self.stop_timeout = stop_timeout
        self.on_start = on_start
        self._managed = [
            _Managed(s, Worker(name=s.name, url=s.url, region=s.region, preset=s.preset, api_key=s.api_key))
            for s in specs
        ]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def managed(self) -> list[_Managed]:
        return self._managed

    def pid_of(self, name: str) -> int | None:
        for m in self._managed:
            if m.spec.name == name and m.proc is not None and m.proc.returncode is None:
                return m.proc.pid
        return None

    def spec_of(self, name: str) -> WorkerSpec | None:
        return next((m.spec for m in self._managed if m.spec.name == name), None)

    def restarts_of(self, name: str) -> int:
        return next((m.restarts for m in self._managed if m.spec.name == name), 0)

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self._managed if m.proc is not None and m.proc.returncode is None]

    async def start(self) -> None:
        for m in self._managed:
            m.worker.reason = "starting"
            self.registry.add(m.worker)
            self.metrics.worker_up.labels(m.spec.region, m.spec.preset, m.spec.name).set(0)
            self.metrics.worker_restarts.labels(m.spec.region, m.spec.preset, m.spec.name)
            self._tasks.append(asyncio.create_task(self._keep_running(m), name=f"supervise-{m.spec.name}"))

    async def _spawn(self, m: _Managed) -> None:
        spec = m.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(spec.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            logf.write(f"\n==== tokengate: starting {spec.name}: {' '.join(spec.argv)}\n".encode())
            logf.flush()
            m.proc = await asyncio.create_subprocess_exec(
                *spec.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env}, start_new_session=True, preexec_fn=_die_with_parent,
            )
        finally:
            logf.close()
        m.started_at = time.monotonic()
        log.info("worker %s started (pid %d, port %d), log: %s", spec.name, m.proc.pid, spec.port, spec.log_path)
        if self.on_start is not None:
            self.on_start()

    async def _keep_running(self, m: _Managed) -> None:
        while not m.stopping:
            try:
                await self._spawn(m)
            except OSError as exc:
                log.error("worker %s could not start: %s", m.spec.name, exc)
                m.exits.append(-1)
            else:
                assert m.proc is not None
                code = await m.proc.wait()
                m.exits.append(code)
                if m.stopping:
                    return
                log.warning("worker %s exited with %s", m.spec.name, code)
            self.registry.update(m.worker, ready=False, reason=f"exited ({m.exits[-1]}), restarting")
            self.metrics.worker_up.labels(m.spec.region, m.spec.preset, m.spec.name).set(0)
            with contextlib.suppress(ProcessLookupError):
                if m.proc is not None:
                    os.killpg(m.proc.pid, signal.SIGKILL)  # engine children of a dead server
            up_for = time.monotonic() - m.started_at
            m.failures_in_row = 1 if up_for >= self.healthy_after else m.failures_in_row + 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (m.failures_in_row - 1))
            if m.failures_in_row > 1:
                m.worker.reason = f"crash loop: {m.failures_in_row} exits in a row, next start in {delay:g} s"
            self.registry.update(m.worker, ready=False, reason=m.worker.reason)
            await asyncio.sleep(delay)
            m.restarts += 1
            self.metrics.worker_restarts.labels(m.spec.region, m.spec.preset, m.spec.name).inc()

    async def stop(self) -> None:
        """TERM every worker's process group, wait, then KILL what is left."""
        for m in self._managed:
            m.stopping = True
            self.registry.update(m.worker, ready=False, reason="stopping")
        for task in self._tasks:
            if not task.done():
                task.cancel()
        procs = [m.proc for m in self._managed if m.proc is not None and m.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("worker pid %d ignored SIGTERM; killing", p.pid)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                await asyncio.wait_for(p.wait(), 5)
        await asyncio.gather(*self._tasks, return_exceptions=True)
