"""WriteWatchdog: a stream whose write has waited past the limit is cancelled; others are left alone."""

from __future__ import annotations

import asyncio
from time import monotonic

from app.exchange import Exchange
from app.watchdog import WriteWatchdog


class _Count:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> None:
        self.n += 1


async def _scenario() -> tuple[bool, bool, bool, bool, int]:
    stalls = _Count()
    dog = WriteWatchdog(0.2, stalls)
    stuck_task = asyncio.create_task(asyncio.sleep(10))
    busy_task = asyncio.create_task(asyncio.sleep(10))
    stuck, busy = Exchange(stuck_task), Exchange(busy_task)
    stuck.sending_since = monotonic()  # a write that never finishes
    dog.track(stuck)
    dog.track(busy)  # writes that finish at once: sending_since goes back to 0
    for _ in range(10):
        busy.sending_since = monotonic()
        await asyncio.sleep(0.02)
        busy.sending_since = 0.0
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.2)
    dog.stop()
    result = (stuck_task.cancelled() or stuck_task.cancelling() > 0, stuck.client_gone,
              busy_task.done(), busy.client_gone, stalls.n)
    busy_task.cancel()
    return result


def test_only_a_stalled_write_is_dropped() -> None:
    stuck_cancelled, stuck_gone, busy_done, busy_gone, stalls = asyncio.run(_scenario())
    assert stuck_cancelled and stuck_gone and stalls == 1
    assert not busy_done and not busy_gone
