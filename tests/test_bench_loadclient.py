"""bench/loadclient.py's closed loop against the fake worker on a real socket: counts, and the think time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest

from bench.fakeworker import ThreadedFakeWorker
from bench.loadclient import LoadResult, Target, chat_body, completed_between, run_closed, run_open


@pytest.fixture(scope="module")
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker() as w:
        yield w


def test_closed_loop_runs_the_requests_it_was_given(worker: ThreadedFakeWorker) -> None:
    target = Target.build(worker.url, chat_body(max_tokens=4, stream=True))
    res = asyncio.run(run_closed(target, concurrency=3, requests=9, timeout=10))
    assert len(res.records) == 9
    assert all(r.ok and r.done for r in res.records)


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


def test_lead_in_requests_are_kept_apart_from_the_measured_window() -> None:
    """With a lead-in, what was sent before the window opens is in ``lead`` (the synchronised start of all
    streams), the window's requests in ``records``, the CPU hooks fire once each as the window opens and closes,
    and ``elapsed`` covers the window only."""
    opened: list[float] = []
    closed: list[float] = []
    with ThreadedFakeWorker(ttft=0.05) as w:
        target = Target.build(w.url, chat_body(max_tokens=2, stream=True))

        async def go() -> tuple[float, float, LoadResult]:
            t0 = time.perf_counter()
            res = await run_closed(target, concurrency=2, duration=0.3, timeout=10, lead_in=0.3,
                                   on_window=lambda: opened.append(time.perf_counter()),
                                   on_close=lambda: closed.append(time.perf_counter()))
            return t0, time.perf_counter(), res

        t0, t1, res = asyncio.run(go())
    assert len(opened) == 1 and opened[0] - t0 >= 0.29
    assert len(closed) == 1 and closed[0] - opened[0] >= 0.29
    assert res.lead and res.records
    assert all(r.ok for r in res.lead + res.records)
    assert max(r.start for r in res.lead) < opened[0] <= min(r.start for r in res.records)
    assert len(res.lead) >= 2 * 4  # two streams, ~50 ms a request, 0.3 s before the window
    assert res.elapsed < (t1 - t0) - 0.25  # the lead-in is not part of the measured time
    inside = completed_between(res, opened[0], closed[0])
    assert 2 * 4 <= inside <= len(res.records) + 2  # ~0.3 s of two streams; the lead-in's last two end inside
