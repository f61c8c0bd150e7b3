"""Draining in a ``--workers N`` gateway process.

Each process of ``tokengate serve --workers N`` is a child of uvicorn's multiprocess supervisor, running uvicorn's
own ``Server``: the SIGTERM the supervisor forwards would close its socket at once (clients meet "connection
refused" or a dropped request, never a 503). ``drain_on_sigterm`` wraps that server's signal handler so a child
drains as a single gateway process does (``cli.DrainingServer``): the first SIGTERM/SIGINT marks it draining
(``/readyz`` 503, new requests 503) while in-flight requests finish, up to ``drain_timeout``; then the server
shuts down, and what still runs is cancelled (a stream ends with an in-band error).

What ends the wait at once is narrower than in one process: a SIGINT while draining (a second Ctrl-C). A signal
sent to the whole process group (a terminal's Ctrl-C, ``kill -TERM -PGID``, systemd) reaches a child directly and
then again as the supervisor's forwarded SIGTERM; that SIGTERM must not count as a second signal, so a SIGTERM
never does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from types import FrameType

import uvicorn

from .state import AppState

log = logging.getLogger("tokengate")


def drain_on_sigterm(state: AppState, loop: asyncio.AbstractEventLoop) -> bool:
    """Wrap the running uvicorn server's SIGTERM/SIGINT handling (call it in the lifespan, once started). False
    when no uvicorn server handles them in this process (nothing is changed)."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(server, uvicorn.Server):
        return False
    timeout = state.settings.drain_timeout
    waiting: set[asyncio.Task[None]] = set()

    async def finish(sig: int, deadline: float) -> None:
        while time.monotonic() < deadline and server.server_state.tasks:  # every request has finished, or time is up
            await asyncio.sleep(0.1)
        server.config.timeout_graceful_shutdown = max(0, math.ceil(deadline - time.monotonic()))
        server.handle_exit(sig, None)

    def start(sig: int) -> None:
        task = loop.create_task(finish(sig, time.monotonic() + timeout), name="drain")
        waiting.add(task)
        task.add_done_callback(waiting.discard)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if state.proxy.draining or server.should_exit:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                for task in waiting:
                    task.cancel()
                server.config.timeout_graceful_shutdown = 0
                server.handle_exit(sig, frame)
            return  # (a SIGTERM: the supervisor forwarding what this process already had)
        state.proxy.draining = True
        log.warning("draining: requests in flight may finish (up to %g s)", timeout)
        loop.call_soon_threadsafe(start, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return True
