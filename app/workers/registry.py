"""The live worker table. Writers (discovery, the supervisor) replace entries; routing reads snapshots.

A ``Worker`` is one vLLM OpenAI server. Its membership data (models, readiness) changes only through the
registry, which then publishes a new immutable ``Snapshot``; the one mutable field read on the hot path is
``in_flight``, a plain int that only the event loop touches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..upstream import Origin


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    max_model_len: int
    root: str | None = None


@dataclass(eq=False, slots=True)
class Worker:
    name: str
    url: str
    region: str = "local"
    preset: str = "external"
    api_key: str | None = None
    models: dict[str, ModelInfo] = field(default_factory=dict)
    ready: bool = False
    reason: str = "not checked yet"
    in_flight: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    explicit_abort: bool = True  # POST /inference/v1/abort_requests answers (unless it said no since it was ready)
    process_down: bool = False  # a managed worker whose process is not running: its supervisor gives the reason
    expected_models: frozenset[str] = frozenset()  # what a managed worker will serve once ready
    slow_checks: int = 0  # health checks in a row that timed out
    ready_at: float | None = None  # monotonic time it last became ready
    origin: Origin = field(init=False)

    def __post_init__(self) -> None:
        self.origin = Origin.parse(self.url)

    def routable(self, now: float) -> bool:
        return self.ready and self.ejected_until <= now


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    workers: tuple[Worker, ...]
    by_model: dict[str, tuple[Worker, ...]]  # ready workers serving each model
    models: dict[str, ModelInfo]  # every model a ready worker serves (smallest max_model_len wins)
    # memos filled on first use by routing (the snapshot never changes): (model, region) -> its workers, and
    # id(pool) -> (pool, its sorted region/preset names); holding the pool keeps its id from being reused
    by_region: dict[tuple[str, str], tuple[Worker, ...]] = field(default_factory=dict, compare=False, repr=False)
    placements: dict[int, tuple[tuple[Worker, ...], tuple[str, ...]]] = field(default_factory=dict, compare=False,
                                                                              repr=False)


def doubling(base: float, cap: float, n: int) -> float:
    """``base`` doubled ``n`` times, at most ``cap`` (the exponent stops at 64: 2.0 ** 1024 overflows a float, which
    ~1 100 failures in a row reached)."""
    return min(cap, base * 2.0 ** min(n, 64))


class Registry:
    """Eject policy: after ``eject_after`` consecutive failures a worker is out of rotation for a backoff that
    doubles up to ``eject_max`` — but never the last routable worker of a model."""

    def __init__(self, *, eject_after: int = 3, eject_base: float = 2.0, eject_max: float = 60.0) -> None:
        self._workers: dict[str, Worker] = {}
        self._version = 0
        self._snapshot = Snapshot(0, (), {}, {})
        self.eject_after = eject_after
        self.eject_base = eject_base
        self.eject_max = eject_max

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def workers(self) -> tuple[Worker, ...]:
        return self._snapshot.workers

    def get(self, name: str) -> Worker | None:
        return self._workers.get(name)

    def add(self, worker: Worker) -> None:
        self._workers[worker.name] = worker
        self._publish()

    def remove(self, name: str) -> None:
        if self._workers.pop(name, None) is not None:
            self._publish()

    def update(self, worker: Worker, *, ready: bool, reason: str = "", models: dict[str, ModelInfo] | None = None
               ) -> None:
        changed = worker.ready != ready or (models is not None and models != worker.models)
        if ready and not worker.ready:
            worker.ready_at = time.monotonic()
            worker.explicit_abort = True  # back (maybe restarted, maybe upgraded): its abort endpoint is asked again
            # a fresh start; a health check of a worker already ready does not clear its requests' failures (one
            # that answers /health but not its requests — hung past the read timeout — would never be ejected)
            worker.consecutive_failures = 0
        worker.ready = ready
        worker.reason = reason
        if models is not None:
            worker.models = models
        if changed:
            self._publish()

    def record_failure(self, worker: Worker) -> None:
        worker.consecutive_failures += 1
        if worker.consecutive_failures < self.eject_after:
            return
        now = time.monotonic()
        # peers: the workers a request for one of its models could go to instead, i.e. in its region (routing
        # never crosses regions)
        peers = [w for m in worker.models for w in self._snapshot.by_model.get(m, ())
                 if w is not worker and w.region == worker.region]
        if not any(p.routable(now) for p in peers):
            return  # never eject the last one of its region: a struggling worker beats none
        worker.ejected_until = now + doubling(self.eject_base, self.eject_max,
                                              worker.consecutive_failures - self.eject_after)

    def record_success(self, worker: Worker) -> None:
        if worker.consecutive_failures:
            worker.consecutive_failures = 0
            worker.ejected_until = 0.0

    def _publish(self) -> None:
        self._version += 1
        workers = tuple(self._workers.values())
        by_model: dict[str, list[Worker]] = {}
        models: dict[str, ModelInfo] = {}
        for w in workers:
            if not w.ready:
                continue
            for mid, info in w.models.items():
                by_model.setdefault(mid, []).append(w)
                known = models.get(mid)
                if known is None or info.max_model_len < known.max_model_len:
                    models[mid] = info
        self._snapshot = Snapshot(self._version, workers, {m: tuple(ws) for m, ws in by_model.items()}, models)
