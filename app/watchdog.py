"""Clients that stop reading: one timer for every live stream.

A client that stops reading fills its socket buffer, then the gateway's (both bounded), and then the relay waits
in ``send``. An exchange marks when a write began (``sending_since``, two attribute writes per chunk); past
``limit`` seconds the client is treated as gone: its connection is closed, its task cancelled, and the proxy aborts
the worker request.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any

from .exchange import Exchange


class WriteWatchdog:
    def __init__(self, limit: float, stalls: Any) -> None:
        self.limit = limit
        self.stalls = stalls  # a counter: streams dropped for not reading
        self._live: set[Exchange] = set()
        self._task: asyncio.Task[None] | None = None

    def track(self, ex: Exchange) -> None:
        self._live.add(ex)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def untrack(self, ex: Exchange) -> None:
        self._live.discard(ex)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.limit / 4))
            self._scan(monotonic())

    def _scan(self, now: float) -> None:
        # a method of its own: the loop variable must not keep the last exchange alive while _run sleeps
        for ex in list(self._live):
            since = ex.sending_since
            if since and now - since > self.limit and not ex.done and ex.task is not None:
                self._live.discard(ex)  # dropped once
                ex.client_gone = True
                self.stalls.inc()
                if ex.client is not None:
                    ex.client.drop()
                ex.task.cancel()
