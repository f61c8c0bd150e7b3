"""Busy polling (app.busypoll): the loop keeps polling while a few requests are in flight and ``linger`` after,
not under load, then sleeps again; and the gateway's ``--busy-poll`` wiring (flag, counter, requests answered)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from app.busypoll import BusyPoll
from app.cli import build_parser, settings_from_args
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import metric_sum, run_gateway, scrape, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": False}


class Spent:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, seconds: float) -> None:
        assert seconds >= 0
        self.seconds += seconds
        self.calls += 1


async def _passes_during(poll: BusyPoll, seconds: float) -> int:
    before = poll.passes
    await asyncio.sleep(seconds)
    return poll.passes - before


def test_polls_while_busy_and_for_linger_after_then_sleeps() -> None:
    async def main() -> None:
        in_flight = [1]
        spent = Spent()
        poll = BusyPoll(0.2, lambda: in_flight[0], spent)
        poll.wake()
        # a sleeping loop makes one or two passes in 30 ms; a polling one thousands
        assert await _passes_during(poll, 0.03) > 50
        assert poll.active
        in_flight[0] = 0
        t0 = time.monotonic()
        await asyncio.sleep(0.03)
        assert poll.active, "stopped before linger ran out"
        while poll.active:
            await asyncio.sleep(0.005)
            assert time.monotonic() - t0 < 2, "still polling long after linger"
        assert await _passes_during(poll, 0.05) == 0
        assert 0.2 <= spent.seconds < 3

    asyncio.run(main())


def test_a_wake_without_requests_in_flight_polls_for_linger() -> None:
    async def main() -> None:
        spent = Spent()
        poll = BusyPoll(0.04, lambda: 0, spent)
        poll.wake()
        assert poll.active
        await asyncio.sleep(0.2)
        assert not poll.active
        assert 0.04 <= spent.seconds < 0.2
        poll.wake()  # the next request starts it again
        assert await _passes_during(poll, 0.01) > 5

    asyncio.run(main())


def test_stop_ends_polling_and_a_later_wake_runs_one_chain() -> None:
    async def main() -> None:
        spent = Spent()
        poll = BusyPoll(10.0, lambda: 1, spent)
        poll.wake()
        await asyncio.sleep(0.01)
        poll.stop()
        assert not poll.active and spent.calls == 1
        assert await _passes_during(poll, 0.03) == 0
        poll.stop()  # idempotent
        assert spent.calls == 1
        poll.wake()
        poll.stop()
        poll.wake()
        # one chain: each loop pass advances ``passes`` by one (two chains: two per pass)
        loop_passes = 0
        before = poll.passes
        for _ in range(50):
            await asyncio.sleep(0)
            loop_passes += 1
        assert poll.passes - before <= loop_passes + 1
        poll.stop()

    asyncio.run(main())


def test_polling_time_is_reported_while_polling_goes_on() -> None:
    async def main() -> None:
        now = [0.0]
        spent = Spent()
        poll = BusyPoll(1.0, lambda: 1, spent, clock=lambda: now[0])
        poll.wake()
        for _ in range(5):
            now[0] += 0.5
            await asyncio.sleep(0)
        assert spent.seconds >= 2.0, "a poll that never stops must still be counted"
        poll.stop()
        assert spent.seconds == pytest.approx(now[0])

    asyncio.run(main())


def test_no_polling_under_load() -> None:
    async def main() -> None:
        in_flight = [1]
        spent = Spent()
        poll = BusyPoll(10.0, lambda: in_flight[0], spent, max_in_flight=2)
        poll.wake()
        assert await _passes_during(poll, 0.02) > 10
        in_flight[0] = 3  # more than max_in_flight: the loop sleeps between events again
        await asyncio.sleep(0.01)
        assert not poll.active and spent.calls == 1
        assert await _passes_during(poll, 0.03) == 0
        in_flight[0] = 2  # an arrival that makes it more than max_in_flight does not start polling at all
        poll.wake()
        assert not poll.active
        assert await _passes_during(poll, 0.01) == 0 and spent.calls == 1
        in_flight[0] = 1  # light again: the next arrival polls
        poll.wake()
        assert await _passes_during(poll, 0.02) > 10
        poll.stop()

    asyncio.run(main())


def test_linger_and_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        BusyPoll(0, lambda: 0, lambda s: None)
    with pytest.raises(ValueError):
        BusyPoll(1.0, lambda: 0, lambda s: None, max_in_flight=0)


def test_flag_and_environment() -> None:
    args = build_parser().parse_args(["serve", "--busy-poll", "0.05"])
    assert settings_from_args(args).busy_poll == 0.05
    assert Settings().busy_poll == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENGATE_BUSY_POLL", "0.2")
        assert Settings().busy_poll == 0.2
    with pytest.raises(ValueError):
        Settings(busy_poll=-1)


@pytest.fixture(scope="module")
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker() as w:
        yield w


def _counter(url: str) -> float:
    return metric_sum(scrape(url + "/metrics"), "tokengate_busy_poll_seconds_total")


def test_gateway_polls_around_requests_and_counts_it(worker: ThreadedFakeWorker) -> None:
    settings = Settings(upstream=[worker.url], discovery_interval=60.0, busy_poll=1.0)
    with run_gateway(settings, ready_timeout=20) as gw:
        poll = gw.state.proxy.busy_poll
        assert poll is not None and not poll.active
        assert _counter(gw.url) == 0
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert poll.active, "a request must start polling, for linger after it"
        wait_until(lambda: not poll.active, 5, "polling to stop after linger")
        spent = _counter(gw.url)
        assert 1.0 <= spent < 5
        time.sleep(0.3)
        assert _counter(gw.url) == spent, "an idle gateway must sleep, not poll"


def test_gateway_without_busy_poll_never_polls(worker: ThreadedFakeWorker) -> None:
    with run_gateway(Settings(upstream=[worker.url], discovery_interval=60.0), ready_timeout=20) as gw:
        assert gw.state.proxy.busy_poll is None
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200
        assert _counter(gw.url) == 0
