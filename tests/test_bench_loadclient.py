"""bench/loadclient.py's closed loop against the fake worker on a real socket: counts, and the think time."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterator

import pytest

from bench.fakeworker import ThreadedFakeWorker
from bench.loadclient import LoadResult, Target, chat_body, run_closed, run_open


@pytest.fixture(scope="module")
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker() as w:
        yield w


def test_closed_loop_runs_the_requests_it_was_given(worker: ThreadedFakeWorker) -> None:
    target = Target.build(worker.url, chat_body(max_tokens=4, stream=True))
    res = asyncio.run(run_closed(target, concurrency=3, requests=9, timeout=10))
    assert len(res.records) == 9
    assert all(r.ok and r.done for r in res.records)
    assert res.window is None and res.window_scale == 1.0  # its own window: CPU around it is the records' CPU


def test_think_time_waits_the_seeded_draws_before_each_request(worker: ThreadedFakeWorker) -> None:
    target = Target.build(worker.url, chat_body(max_tokens=2, stream=True))
    rng = random.Random(0)  # stream 0's draws: the loop seeds each stream with its index
    waits = sum(rng.uniform(0.0, 0.1) for _ in range(5))
    res = asyncio.run(run_closed(target, concurrency=1, requests=5, timeout=10, think=0.1))
    assert len(res.records) == 5 and all(r.ok for r in res.records)
    assert waits > 0.1  # the draws are not all near zero: the bound below means something
    assert res.elapsed >= waits


def test_open_loop_refuses_arrivals_past_its_in_flight_cap() -> None:
    """A target that can't keep up must not exhaust the client's file descriptors: past ``max_in_flight`` open
    requests, arrivals fail at once (and are counted) instead of opening another connection."""
    with ThreadedFakeWorker(ttft=0.3) as slow:
        target = Target.build(slow.url, chat_body(max_tokens=2, stream=True))
        res = asyncio.run(run_open(target, rate=200, duration=0.5, timeout=10, max_in_flight=4))
    refused = [r for r in res.records if r.error and "already open" in r.error]
    served = [r for r in res.records if r.ok]
    assert refused and len(served) <= 4 * 2  # at most 4 open at a time, each lasting ~0.3 s of the 0.5 s
    assert len(refused) + len(served) == len(res.records)


def test_lead_in_keeps_the_requests_completed_inside_the_measured_window() -> None:
    """With a lead-in, ``records`` are the requests that completed while the window was open (the closed loop's
    synchronised start and the streams' last requests are ``outside``), the CPU hooks fire once each as the window
    opens and closes, and ``elapsed`` is the window's length."""
    opened: list[float] = []
    closed: list[float] = []
    with ThreadedFakeWorker(ttft=0.05) as w:
        target = Target.build(w.url, chat_body(max_tokens=2, stream=True))

        async def go() -> tuple[float, LoadResult]:
            t0 = time.perf_counter()
            res = await run_closed(target, concurrency=2, duration=0.3, timeout=10, lead_in=0.3,
                                   on_window=lambda: opened.append(time.perf_counter()),
                                   on_close=lambda: closed.append(time.perf_counter()))
            return t0, res

        t0, res = asyncio.run(go())
    assert len(opened) == 1 and opened[0] - t0 >= 0.29
    assert len(closed) == 1 and closed[0] - opened[0] >= 0.29
    assert all(r.ok for r in res.outside + res.records)
    assert all(opened[0] <= r.start + r.e2e < closed[0] for r in res.records)
    assert all(not opened[0] <= r.start + r.e2e < closed[0] for r in res.outside)
    assert 2 * 3 <= len(res.records) <= 2 * 7  # ~0.3 s of two streams at ~50 ms a request
    assert len(res.firsts) == 2 and all(r in res.outside for r in res.firsts)  # the synchronised start is outside
    assert any(r.start + r.e2e >= closed[0] for r in res.outside)  # so are the requests running at the close
    assert res.window is not None and abs(res.window - (closed[0] - opened[0])) < 0.001
    # the rate is the closed loop's: two streams, each request ~50 ms send to send
    per_request = statistics.fmean(r.e2e for r in res.records)
    assert abs(len(res.records) / res.elapsed - 2 / per_request) < 0.3 * (2 / per_request)
    assert res.window_scale == res.elapsed / res.window  # the window's CPU -> the records' CPU at that rate


def test_a_windowed_rate_does_not_depend_on_where_lock_step_waves_fall() -> None:
    """Streams in lock-step complete in waves; a window holds a whole number of them, so counting completions
    would put the rate anywhere between those counts. The closed loop's rate (C / time between sends) doesn't
    move with the phase."""
    rates = []
    with ThreadedFakeWorker(ttft=0.1) as w:
        target = Target.build(w.url, chat_body(max_tokens=2, stream=True))
        for window in (0.25, 0.3, 0.35):  # 2.5, 3 and 3.5 request durations: counting gives 2, 3 or 4 waves
            res = asyncio.run(run_closed(target, concurrency=4, duration=window, timeout=10, lead_in=0.15))
            rates.append(len(res.records) / res.elapsed)
    assert max(rates) / min(rates) < 1.12  # counting completions: 32-40 req/s, 1.25 apart
    assert all(abs(r - 4 / 0.1) < 0.25 * 40 for r in rates)


def test_a_lead_in_needs_a_duration_without_a_request_cap(worker: ThreadedFakeWorker) -> None:
    target = Target.build(worker.url, chat_body(max_tokens=2, stream=True))
    with pytest.raises(ValueError, match="lead-in"):
        asyncio.run(run_closed(target, concurrency=1, duration=1.0, requests=5, lead_in=0.5))
    with pytest.raises(ValueError, match="lead-in"):
        asyncio.run(run_closed(target, concurrency=1, duration=0.0, lead_in=0.5))


def test_streams_that_end_before_the_window_still_open_and_close_it_once(worker: ThreadedFakeWorker) -> None:
    """A round whose streams all end before the lead-in is over (a request longer than the whole run): each hook
    fires once, in order, and nothing is counted as measured."""
    calls: list[str] = []
    with ThreadedFakeWorker(ttft=0.3) as slow:
        target = Target.build(slow.url, chat_body(max_tokens=2, stream=True))
        res = asyncio.run(run_closed(target, concurrency=1, duration=0.01, timeout=10, lead_in=0.05,
                                     on_window=lambda: calls.append("open"), on_close=lambda: calls.append("close")))
    assert calls == ["open", "close"]
    assert res.records == [] and len(res.outside) == 1 and res.firsts == res.outside
