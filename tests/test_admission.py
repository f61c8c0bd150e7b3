from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from app.admission import AdmissionController, PoolGates, Slot
from app.errors import NoWorkerAvailable, RateLimited, render


async def _tick(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_admits_up_to_max_in_flight_then_queues_then_429_when_queue_full() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=2, max_queue=1, queue_timeout=5)
        a, b = await ctl.acquire(), await ctl.acquire()
        assert a.queued == 0.0 and ctl.in_flight == 2
        waiting = asyncio.create_task(ctl.acquire())
        await _tick()
        assert ctl.queued == 1 and not waiting.done()
        t0 = time.monotonic()
        with pytest.raises(RateLimited) as info:
            await ctl.acquire()
        assert time.monotonic() - t0 < 0.05  # refused at once, not after a wait
        status, headers, body = render(info.value)
        assert status == 429 and orjson.loads(body)["error"]["code"] == "queue_full"
        assert (b"retry-after", b"1") in headers
        a.release()
        c = await waiting
        assert c.queued > 0 and ctl.in_flight == 2 and ctl.queued == 0
        b.release()
        c.release()
        assert ctl.in_flight == 0

    asyncio.run(main())


def test_wait_beyond_timeout_is_503_not_a_hang() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=4, queue_timeout=0.2)
        held = await ctl.acquire()
        t0 = time.monotonic()
        with pytest.raises(NoWorkerAvailable) as info:
            await ctl.acquire()
        waited = time.monotonic() - t0
        assert 0.15 < waited < 1.0
        status, headers, body = render(info.value)
        assert status == 503 and orjson.loads(body)["error"]["code"] == "queue_timeout"
        assert any(name == b"retry-after" for name, _ in headers)
        assert ctl.queued == 0 and ctl.in_flight == 1
        with pytest.raises(NoWorkerAvailable):  # a per-request timeout overrides the pool's
            await ctl.acquire(timeout=0.05)
        held.release()
        assert ctl.in_flight == 0

    asyncio.run(main())


def test_priority_classes_first_then_fifo_within_a_class() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=10, queue_timeout=5)
        held = await ctl.acquire()
        order: list[str] = []

        async def one(label: str, priority: int) -> None:
            async with ctl.admit(priority=priority) as slot:
                assert slot.priority == priority
                order.append(label)
                await asyncio.sleep(0)

        tasks = []
        for label, prio in [("low1", -10), ("n1", 0), ("high1", 10), ("n2", 0), ("high2", 10), ("low2", -10)]:
            tasks.append(asyncio.create_task(one(label, prio)))
            await _tick()
        held.release()
        await asyncio.gather(*tasks)
        assert order == ["high1", "high2", "n1", "n2", "low1", "low2"]
        assert ctl.in_flight == 0 and ctl.queued == 0

    asyncio.run(main())


def test_a_full_queue_makes_room_for_higher_priority_by_displacing_the_newest_lowest() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=2, queue_timeout=5)
        held = await ctl.acquire()
        low_old = asyncio.create_task(ctl.acquire(priority=-10))
        await _tick()
        low_new = asyncio.create_task(ctl.acquire(priority=-10))
        await _tick()
        with pytest.raises(RateLimited):  # same priority as nobody lower: refused
            await ctl.acquire(priority=-10)
        high = asyncio.create_task(ctl.acquire(priority=10))
        await _tick()
        with pytest.raises(RateLimited, match="displaced"):
            await low_new
        assert ctl.queued == 2
        held.release()
        (await high).release()
        (await low_old).release()
        assert ctl.in_flight == 0 and ctl.queued == 0

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue_and_leaks_no_slot() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=3, queue_timeout=5)
        held = await ctl.acquire()
        gone = asyncio.create_task(ctl.acquire())
        stays = asyncio.create_task(ctl.acquire())
        await _tick()
        assert ctl.queued == 2
        gone.cancel()  # the client went away while queued
        await asyncio.gather(gone, return_exceptions=True)
        assert ctl.queued == 1
        held.release()
        slot = await stays
        assert ctl.in_flight == 1
        slot.release()
        assert ctl.in_flight == 0 and ctl.queued == 0

    asyncio.run(main())


def test_slot_handed_over_while_the_waiter_is_cancelled_is_passed_on() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=3, queue_timeout=5)
        held = await ctl.acquire()
        first = asyncio.create_task(ctl.acquire())
        second = asyncio.create_task(ctl.acquire())
        await _tick()
        held.release()  # the slot goes to `first`'s future ...
        first.cancel()  # ... which is cancelled before it resumes
        await asyncio.gather(first, return_exceptions=True)
        assert first.cancelled()
        slot = await asyncio.wait_for(second, 1)
        assert ctl.in_flight == 1
        slot.release()
        assert ctl.in_flight == 0

    asyncio.run(main())


def test_release_is_idempotent_and_context_manager_releases_on_error() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=2, max_queue=0, queue_timeout=1)
        slot = await ctl.acquire()
        slot.release()
        slot.release()
        assert ctl.in_flight == 0
        with pytest.raises(KeyError):
            async with ctl.admit():
                assert ctl.in_flight == 1
                raise KeyError("boom")
        assert ctl.in_flight == 0

    asyncio.run(main())


def test_no_queue_means_immediate_429() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=0, queue_timeout=1)
        held = await ctl.acquire()
        with pytest.raises(RateLimited):
            await ctl.acquire(priority=100)
        held.release()

    asyncio.run(main())


def test_overload_under_many_concurrent_clients_stays_bounded_and_balanced() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=4, max_queue=8, queue_timeout=0.3)
        peak = 0
        outcomes: dict[str, int] = {"ok": 0, "429": 0, "503": 0, "cancelled": 0}

        async def client(i: int) -> None:
            nonlocal peak
            try:
                async with ctl.admit(priority=i % 3):
                    peak = max(peak, ctl.in_flight)
                    assert ctl.queued <= 8
                    await asyncio.sleep(0.02)
                outcomes["ok"] += 1
            except RateLimited:
                outcomes["429"] += 1
            except NoWorkerAvailable:
                outcomes["503"] += 1

        tasks = [asyncio.create_task(client(i)) for i in range(60)]
        await asyncio.sleep(0.03)
        for t in tasks[10:20]:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        outcomes["cancelled"] = sum(isinstance(r, asyncio.CancelledError) for r in results)
        assert peak == 4
        assert sum(outcomes.values()) == 60
        assert outcomes["ok"] >= 8 and outcomes["429"] >= 40
        assert ctl.in_flight == 0 and ctl.queued == 0

    asyncio.run(main())


def test_retry_after_follows_how_long_slots_are_held() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=0, queue_timeout=1)
        slot = await ctl.acquire()
        slot._granted -= 2.5  # as if held for 2.5 s
        slot.release()
        await ctl.acquire()
        with pytest.raises(RateLimited) as info:
            await ctl.acquire()
        assert info.value.retry_after == 3.0

    asyncio.run(main())


def test_close_fails_waiters_with_503_and_refuses_new_ones() -> None:
    async def main() -> None:
        ctl = AdmissionController(max_in_flight=1, max_queue=2, queue_timeout=5)
        held = await ctl.acquire()
        waiting = asyncio.create_task(ctl.acquire())
        await _tick()
        ctl.close()
        with pytest.raises(NoWorkerAvailable, match="shutting down"):
            await waiting
        with pytest.raises(NoWorkerAvailable):
            await ctl.acquire()
        held.release()
        assert ctl.in_flight == 0

    asyncio.run(main())


def test_invalid_bounds_are_refused() -> None:
    for args in [(0, 1, 1.0), (1, -1, 1.0), (1, 1, 0.0)]:
        with pytest.raises(ValueError):
            AdmissionController(*args)
    Slot(0.0, 0).release()  # a slot no controller owns: nothing to release


def test_pool_gates_size_each_pool_to_its_workers_and_split_over_processes() -> None:
    depths: list[tuple[str, str, int]] = []
    gates = PoolGates(per_worker=256, queue_size=1000, queue_timeout=5.0, processes=3,
                      depth=lambda model, region: lambda n: depths.append((model, region, n)))
    fr = gates.get("m", "fr", 2)
    assert (fr.max_in_flight, fr.max_queue) == (-(-512 // 3), -(-1000 // 3))  # this process's share, rounded up
    assert gates.get("m", "fr", 4) is fr and fr.max_in_flight == -(-1024 // 3)  # the pool grew: same gate, resized
    assert gates.get("m", "uae", 1) is not fr and gates.get("m", "uae", 1).max_in_flight == 86
    assert gates.get("m", "fr", 0).max_in_flight == 1  # never below one
    assert gates.queued("m", "fr") == 0 and gates.queued("other", "fr") == 0

    async def scenario() -> None:
        gate = gates.get("m", "fr", 0)  # one slot: the second request queues, and the depth is reported
        async with gate.admit():
            waiter = asyncio.get_running_loop().create_task(gate.acquire())
            await _tick()
            assert gates.queued("m", "fr") == 1 and depths[-1] == ("m", "fr", 1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        gates.close()
        with pytest.raises(NoWorkerAvailable):
            await gate.acquire()

    asyncio.run(scenario())
