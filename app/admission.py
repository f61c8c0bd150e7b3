"""Admission to one worker pool: at most ``max_in_flight`` requests at once, a bounded queue, a queue timeout.

Multi-GPU won't save a bad scheduler: past what the workers can take, a request waits in a short queue and is
refused fast when that is full, never queued without bound and never left hanging.

    controller = AdmissionController(max_in_flight=32, max_queue=128, queue_timeout=10.0)
    async with controller.admit(priority=principal.priority) as slot:
        metrics.queue_time.labels(model, region).observe(slot.queued)
        ...                                    # dispatch to the pool's workers

- queue full → ``RateLimited`` (429, code ``queue_full``) at once, unless a lower-priority request is waiting:
  the newest of the lowest class is then displaced (429) to make room.
- waited ``queue_timeout`` → ``NoWorkerAvailable`` (503, code ``queue_timeout``).
- higher ``priority`` is admitted first; FIFO within a priority.
- a waiter cancelled while queued (client gone) leaves the queue; a slot handed to it at that moment is passed on.
Retry-After: the mean time a slot is held, times the requests ahead, over ``max_in_flight`` (1..60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .errors import GatewayError, NoWorkerAvailable, RateLimited

_EWMA_WEIGHT = 0.2
_MAX_RETRY_AFTER = 60.0


@dataclass(slots=True, eq=False)
class Slot:
    """One admitted request. ``queued``: seconds it waited (0.0 when admitted at once). ``release()`` once done;
    a second call does nothing."""

    queued: float
    priority: int
    _owner: AdmissionController | None = field(default=None, repr=False)
    _granted: float = field(default=0.0, repr=False)

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self)


@dataclass(slots=True, eq=False)
class _Waiter:
    fut: asyncio.Future[Slot]
    priority: int
    enqueued: float


class AdmissionController:
    """Bounded admission for one worker pool; see the module docstring."""

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout: float, *, name: str = "pool") -> None:
        if max_in_flight < 1 or max_queue < 0 or queue_timeout <= 0:
            raise ValueError("need max_in_flight >= 1, max_queue >= 0, queue_timeout > 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.name = name
        self._in_flight = 0
        self._queues: dict[int, deque[_Waiter]] = {}
        self._queued = 0
        self._hold: float | None = None  # moving mean of how long a slot is held
        self._closed: str | None = None
        self.on_queue: Callable[[int], None] | None = None  # told the queue length whenever it changes

    def _set_queued(self, n: int) -> None:
        self._queued = n
        if self.on_queue is not None:
            self.on_queue(n)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @contextlib.asynccontextmanager
    async def admit(self, priority: int = 0, timeout: float | None = None) -> AsyncIterator[Slot]:
        slot = await self.acquire(priority, timeout)
        try:
            yield slot
        finally:
            slot.release()

    async def acquire(self, priority: int = 0, timeout: float | None = None) -> Slot:
        """A slot, at once or after queueing; ``timeout`` overrides the controller's queue timeout."""
        if self._closed is not None:
            raise NoWorkerAvailable(self._closed, retry_after=5, code="shutting_down")
        now = time.monotonic()
        if self._in_flight < self.max_in_flight and not self._queued:
            self._in_flight += 1
            return Slot(0.0, priority, self, now)
        if self._queued >= self.max_queue:
            victim = self._lowest_below(priority)
            if victim is None:
                raise RateLimited(
                    f"worker pool '{self.name}' is overloaded: {self._in_flight} requests in flight and "
                    f"{self._queued} queued. Please retry later.",
                    retry_after=self._retry_after(),
                    code="queue_full",
                )
            self._remove(victim)
            victim.fut.set_exception(
                RateLimited(
                    f"worker pool '{self.name}' is overloaded: displaced from the queue by a higher-priority request.",
                    retry_after=self._retry_after(),
                    code="queue_full",
                )
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), priority, now)
        self._queues.setdefault(priority, deque()).append(waiter)
        self._set_queued(self._queued + 1)
        wait = self.queue_timeout if timeout is None else timeout
        timer = loop.call_later(wait, self._expire, waiter, wait)
        try:
            return await waiter.fut
        except asyncio.CancelledError:
            fut = waiter.fut
            if fut.done() and not fut.cancelled():
                if fut.exception() is None:  # a slot was handed over as we were cancelled: pass it on
                    fut.result().release()
            else:
                self._remove(waiter)
            raise
        finally:
            timer.cancel()

    def close(self, message: str = "the gateway is shutting down") -> None:
        """Refuse new requests and fail every queued one with 503; admitted ones finish normally."""
        self._closed = message
        for queue in self._queues.values():
            for waiter in queue:
                if not waiter.fut.done():
                    waiter.fut.set_exception(NoWorkerAvailable(message, retry_after=5, code="shutting_down"))
        self._queues.clear()
        self._set_queued(0)

    def _release(self, slot: Slot) -> None:
        now = time.monotonic()
        held = now - slot._granted
        self._hold = held if self._hold is None else self._hold + _EWMA_WEIGHT * (held - self._hold)
        while self._queued:
            waiter = self._pop_next()
            if not waiter.fut.done():
                waiter.fut.set_result(Slot(now - waiter.enqueued, waiter.priority, self, now))
                return  # the slot moves to the waiter: in_flight is unchanged
        self._in_flight -= 1

    def _expire(self, waiter: _Waiter, waited: float) -> None:
        if waiter.fut.done():
            return
        self._remove(waiter)
        waiter.fut.set_exception(self._timeout_error(waited))

    def _timeout_error(self, waited: float) -> GatewayError:
        return NoWorkerAvailable(
            f"no worker of pool '{self.name}' became free within {waited:g}s ({self._in_flight} requests in "
            f"flight, {self._queued} queued). Please retry later.",
            retry_after=self._retry_after(),
            code="queue_timeout",
        )

    def _pop_next(self) -> _Waiter:
        best = max(p for p, q in self._queues.items() if q)
        queue = self._queues[best]
        waiter = queue.popleft()
        self._set_queued(self._queued - 1)
        if not queue:
            del self._queues[best]
        return waiter

    def _lowest_below(self, priority: int) -> _Waiter | None:
        present = [p for p, q in self._queues.items() if q]
        if not present or min(present) >= priority:
            return None
        return self._queues[min(present)][-1]  # the newest of the lowest class

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.priority)
        if queue is None:
            return
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self._set_queued(self._queued - 1)
        if not queue:
            del self._queues[waiter.priority]

    def _retry_after(self) -> float:
        hold = 1.0 if self._hold is None else self._hold
        ahead = self._queued + 1
        return float(min(_MAX_RETRY_AFTER, max(1, math.ceil(hold * ahead / self.max_in_flight))))


class PoolGates:
    """The admission controller of each worker pool (a model in a region), sized to the workers the pool has
    now: ``per_worker`` requests in flight each, the queue ``queue_size`` — both split over ``processes`` gateway
    processes (``--workers N``: each takes its share)."""

    def __init__(self, *, per_worker: int, queue_size: int, queue_timeout: float, processes: int = 1,
                 depth: Callable[[str, str], Callable[[int], None]] | None = None) -> None:
        self.per_worker = per_worker
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.processes = processes
        self._depth = depth  # (model, region) -> what is told the queue length (a metric's set)
        self._gates: dict[tuple[str, str], AdmissionController] = {}

    def get(self, model: str, region: str, workers: int) -> AdmissionController:
        capacity = max(1, -(-workers * self.per_worker // self.processes))
        gate = self._gates.get((model, region))
        if gate is None:
            gate = AdmissionController(capacity, -(-self.queue_size // self.processes), self.queue_timeout,
                                       name=f"{model}@{region}")
            if self._depth is not None:
                gate.on_queue = self._depth(model, region)
            self._gates[(model, region)] = gate
        elif gate.max_in_flight != capacity:
            gate.max_in_flight = capacity
        return gate

    def queued(self, model: str, region: str) -> int:
        """Requests waiting for the pool now (0 for a pool that has had none)."""
        gate = self._gates.get((model, region))
        return gate.queued if gate is not None else 0

    def close(self) -> None:
        for gate in self._gates.values():
            gate.close()
