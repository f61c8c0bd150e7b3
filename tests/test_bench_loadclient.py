"""bench/loadclient.py's closed loop against the fake worker on a real socket: counts, and the think time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from bench.fakeworker import ThreadedFakeWorker
from bench.loadclient import Target, chat_body, run_closed, run_open


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
