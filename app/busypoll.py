"""Busy polling: the event loop polls for I/O instead of sleeping while the gateway has requests to serve.

A process that sleeps in ``epoll_wait`` between events pays for each wake-up: on a VM the idle vCPU is halted and
must be scheduled again, and the request path then runs on cold caches. At one stream in front of a GPU that is
most of what a gateway adds to the time to first token (bench/NOTES.md, "Low load": 4–7× the warm cost of every
step of the path). Here, from a request's arrival until ``linger`` seconds after the last request in flight ended,
a callback re-arms itself on every loop pass, so the loop polls with a zero timeout: the request's upstream answer,
and the next request of a client that sends one right after the last, are picked up at once.

Only at light load: an arrival that finds ``max_in_flight`` requests in flight already does not start polling, and
polling stops while more are in flight. Measured on one H200 (bench/NOTES.md, "Same run, same H200"), polling
took 0.05–0.2 ms off the gateway's share of the time to first token at one stream in three runs out of three; at 16
and 64 streams both runs that polled there measured slower (by no more than two identical arms differ in one run),
and a loop that busy has events to wake for anyway, while a spinning core may take from its neighbours.

The price is a CPU core per gateway process, kept busy while it polls: off by default (``--busy-poll SECONDS``),
for machines where a core is cheaper than the latency (a GPU host serving a few streams at a time). Seconds spent
polling are counted in ``tokengate_busy_poll_seconds_total``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

# the polling time is added to the counter at least this often while polling goes on (and when it stops)
_REPORT_EVERY = 1.0
# light load: polling stops while more requests than this are in flight
MAX_IN_FLIGHT = 4


class BusyPoll:
    """``wake()`` on each request's arrival; polls while 1..``max_in_flight`` requests are in flight (``in_flight()``)
    and ``linger`` seconds after the last one ended."""

    __slots__ = ("linger", "max_in_flight", "_in_flight", "_report", "_clock", "_until", "_mark", "_loop", "_handle",
                 "active", "passes")

    def __init__(self, linger: float, in_flight: Callable[[], int], report: Callable[[float], None], *,
                 max_in_flight: int = MAX_IN_FLIGHT, clock: Callable[[], float] = time.monotonic) -> None:
        if linger <= 0 or max_in_flight < 1:
            raise ValueError("need linger > 0 seconds and max_in_flight >= 1")
        self.linger = linger
        self.max_in_flight = max_in_flight
        self._in_flight = in_flight
        self._report = report  # gets seconds spent polling (the counter's inc)
        self._clock = clock
        self._until = 0.0
        self._mark = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None
        self.active = False
        self.passes = 0  # loop passes made while polling

    def wake(self) -> None:
        """A request arrived: poll from now until ``linger`` after the last request in flight is done, unless (or
        until) more than ``max_in_flight`` are. Under load an arrival costs this one count, no loop callback."""
        if not self.active and self._in_flight() < self.max_in_flight:
            now = self._clock()
            self._until = now + self.linger
            self.active = True
            self._mark = now
            self._loop = loop = asyncio.get_running_loop()
            self._handle = loop.call_soon(self._spin)

    def stop(self) -> None:
        """Stop polling now (shutdown); the next ``wake()`` starts again."""
        if self.active:
            if self._handle is not None:
                self._handle.cancel()
            self._end(self._clock())

    def _end(self, now: float) -> None:
        self.active = False
        self._handle = None
        self._report(max(0.0, now - self._mark))

    def _spin(self) -> None:
        self.passes += 1
        now = self._clock()
        n = self._in_flight()
        if n > self.max_in_flight:
            self._end(now)  # not light load: the loop has events to wake for
            return
        if n:
            self._until = now + self.linger
        elif now >= self._until:
            self._end(now)
            return
        if now - self._mark >= _REPORT_EVERY:
            self._report(now - self._mark)
            self._mark = now
        assert self._loop is not None
        self._handle = self._loop.call_soon(self._spin)
