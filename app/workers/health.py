"""Health and readiness of every worker in the registry, external or managed.

A worker is ready when ``/health`` answers 200, ``/v1/models`` lists what it serves, and — on every transition
to ready — a real 1-token generation succeeds (a worker can answer /health while its engine cannot generate).
Checks run concurrently every ``interval`` seconds, each worker's in a task of its own: a probe that hangs (up to
``probe_timeout``) holds back only its own worker's next check, not everyone's. A worker that fails them leaves
rotation at once — unless it was ready and only answered late (a busy worker): then after three late checks in a
row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import GatewayError, GatewayOverloaded, UpstreamTimeout
from ..metrics import GatewayMetrics
from ..tokenizer import TokenizerStore
from ..upstream import UpstreamPool
from .registry import ModelInfo, Registry, Worker

log = logging.getLogger("tokengate.health")
SLOW_CHECKS_TO_FAIL = 3


class HealthChecker:
    def __init__(self, registry: Registry, pool: UpstreamPool, metrics: GatewayMetrics, tokenizers: TokenizerStore,
                 *, interval: float = 5.0, timeout: float = 5.0, probe_timeout: float = 60.0,
                 on_change: Callable[[Worker], None] | None = None) -> None:
        self.registry = registry
        self.pool = pool
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.interval = interval
        self.timeout = timeout
        self.probe_timeout = probe_timeout
        self.on_change = on_change
        self._wake = asyncio.Event()
        self._checks: dict[str, asyncio.Task[None]] = {}  # each worker's check under way

    def poke(self) -> None:
        """Check now (e.g. a managed worker just started)."""
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            for task in self._checks.values():
                task.cancel()

    async def _loop(self) -> None:
        while True:
            await self.check_all(wait=self.timeout)
            self._wake.clear()
            # a worker on its way up (starting, or back from a crash) is checked every second: it takes traffic
            # as soon as it can, not up to a whole interval later
            waiting = any(not w.ready and not w.process_down for w in self.registry.workers())
            try:
                await asyncio.wait_for(self._wake.wait(), min(self.interval, 1.0) if waiting else self.interval)
            except TimeoutError:
                pass

    async def check_all(self, wait: float | None = None) -> None:
        """Check every worker whose previous check is over; wait for them (at most ``wait`` seconds: the ones
        still running go on, and their workers are skipped until they are done)."""
        tasks = []
        for worker in self.registry.workers():
            task = self._checks.get(worker.name)
            if task is None or task.done():
                task = self._checks[worker.name] = asyncio.create_task(self.check(worker),
                                                                        name=f"tokengate-health-{worker.name}")
            tasks.append(task)
        for name in [n for n, t in self._checks.items() if t.done() and self.registry.get(n) is None]:
            del self._checks[name]  # removed workers
        if tasks:
            await asyncio.wait(tasks, timeout=wait)

    async def _get(self, worker: Worker, path: str) -> tuple[int, bytes]:
        headers = [("authorization", f"Bearer {worker.api_key}")] if worker.api_key else []
        resp = await self.pool.request(worker.origin, "GET", path, headers=headers, timeout=self.timeout)
        try:
            body = await resp.read(self.timeout, limit=4 * 1024 * 1024)
        finally:
            resp.release()
        return resp.status, body

    async def _probe(self, worker: Worker, model: str) -> str | None:
        headers = [("content-type", "application/json")]
        if worker.api_key:
            headers.append(("authorization", f"Bearer {worker.api_key}"))
        body = orjson.dumps({"model": model, "prompt": "ready?", "max_tokens": 1, "stream": False})
        resp = await self.pool.request(worker.origin, "POST", "/v1/completions", body, headers=headers,
                                       timeout=self.probe_timeout)
        try:
            data = await resp.read(self.probe_timeout)
        finally:
            resp.release()
        if resp.status != 200:
            return f"1-token generation answered HTTP {resp.status}"
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return "1-token generation answered invalid JSON"
        usage = doc.get("usage") if isinstance(doc, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if type(tokens) is not int or tokens < 1:
            return "1-token generation produced no token"
        return None

    async def check(self, worker: Worker) -> None:
        if worker.process_down:
            return  # not ready, and "exited (-9), restarting" says more than "connection refused" would
        was_ready = worker.ready
        try:
            status, _ = await self._get(worker, "/health")
            if status != 200:
                return self._set(worker, False, f"/health answered HTTP {status}")
            status, body = await self._get(worker, "/v1/models")
            if status != 200:
                return self._set(worker, False, f"/v1/models answered HTTP {status}")
            models = _parse_models(orjson.loads(body))
            if not models:
                return self._set(worker, False, "/v1/models lists no model")
            worker.expected_models = frozenset(models)  # while it can't generate yet: 503 for these, not 404
            if not was_ready:
                for mid in models:
                    problem = await self._probe(worker, mid)
                    if problem:
                        return self._set(worker, False, problem)
            for info in models.values():
                await self.tokenizers.ensure(info.id, info.root)
            self._set(worker, True, "ready", models)
        except GatewayOverloaded as exc:  # the gateway's own limit: the worker is not to blame
            log.error("health check of worker %s skipped: %s", worker.name, exc)
        except UpstreamTimeout as exc:
            # slow is not down: a worker busy with thousands of streams may answer its health check late. A ready
            # worker leaves rotation after SLOW_CHECKS_TO_FAIL slow checks in a row, not on the first
            worker.slow_checks += 1
            if was_ready and worker.slow_checks < SLOW_CHECKS_TO_FAIL:
                log.warning("worker %s answered its health check late (%d in a row): %s", worker.name,
                            worker.slow_checks, exc)
                return
            self._set(worker, False, f"unreachable: {exc}")
        except (GatewayError, OSError, orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            self._set(worker, False, f"unreachable: {exc}")
        except Exception as exc:  # a bug of ours: that worker is not known good, and the other checks go on
            log.exception("health check of worker %s failed", worker.name)
            self._set(worker, False, f"health check failed: {type(exc).__name__}")
        else:
            worker.slow_checks = 0

    def _set(self, worker: Worker, ready: bool, reason: str, models: dict[str, ModelInfo] | None = None) -> None:
        if worker.process_down:
            return  # it exited while this check was under way
        changed = worker.ready != ready
        self.registry.update(worker, ready=ready, reason=reason, models=models)
        self.metrics.worker_up.labels(worker.region, worker.preset, worker.name).set(1 if ready else 0)
        if changed:  # leaving rotation is worth a warning; joining it is routine
            log.log(logging.INFO if ready else logging.WARNING, "worker %s is %s (%s)", worker.name,
                    "ready" if ready else "not ready", reason)
            if self.on_change is not None:
                self.on_change(worker)


def _parse_models(doc: Any) -> dict[str, ModelInfo]:
    """The models of a ``/v1/models`` answer; entries of another shape are left out (a worker listing none is
    not ready), and a ``max_model_len`` that is not a positive integer counts as absent: one worker's ``0`` would
    otherwise make every prompt too long for that model on all workers (the registry keeps the smallest)."""
    out: dict[str, ModelInfo] = {}
    data = doc.get("data") if isinstance(doc, dict) else None
    for item in data if isinstance(data, list) else ():
        if not isinstance(item, dict):
            continue
        mid = item.get("id")
        if not isinstance(mid, str):
            continue
        max_len = item.get("max_model_len")
        root = item.get("root")
        out[mid] = ModelInfo(mid, max_len if type(max_len) is int and max_len > 0 else 4096,
                             root if isinstance(root, str) else None)
    return out
