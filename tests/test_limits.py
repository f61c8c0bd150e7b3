"""Rate limits against a real redis-server (started here on a free loopback port) and in memory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis

from app.auth import OPEN, Principal
from app.errors import NoWorkerAvailable, RateLimited, render
from app.limits import Limiter, Limits, MemoryLimiter, Ticket
from app.limits_redis import RedisLimiter, url_problem

from .utils import redis_server

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["memory", "redis"]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _key(**limits: int) -> Principal:
    return Principal(name=f"k-{uuid.uuid4().hex[:8]}", limits=Limits(**limits))


def _prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _replicas(kind: str, url: str, prefix: str | None = None, **kw: float) -> tuple[Limiter, Limiter]:
    """Two gateway replicas: two RedisLimiters sharing one Redis (in memory there is only one replica)."""
    if kind == "memory":
        one = MemoryLimiter(window=kw.get("window", 60.0))
        return one, one
    prefix = prefix or _prefix()
    return (RedisLimiter.from_url(url, prefix=prefix, **kw), RedisLimiter.from_url(url, prefix=prefix, **kw))


async def _close(*limiters: Limiter) -> None:
    for lim in dict.fromkeys(limiters):
        await lim.aclose()


def _run(
    kind: str, url: str, body: Callable[[Limiter, Limiter], Awaitable[None]], prefix: str | None = None, **kw: float
) -> None:
    async def main() -> None:
        a, b = _replicas(kind, url, prefix, **kw)
        try:
            await body(a, b)
        finally:
            await _close(a, b)

    asyncio.run(main())


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("redis_url") if kind == "redis" else ""


def test_rpm_holds_across_replicas_with_retry_after(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=3)
        for lim in (a, b, a):
            await lim.settle(await lim.admit(key, 1), 1)
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 1)
        assert info.value.retry_after in (59.0, 60.0)  # the oldest admission leaves the minute then
        status, headers, body = render(info.value)
        assert status == 429 and (b"retry-after", str(int(info.value.retry_after)).encode()) in headers
        assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
        assert "requests per minute" in info.value.message
        # OpenAI's rate-limit headers on the refusal too
        wait = b"1m0s" if info.value.retry_after == 60.0 else b"59s"
        assert {(k, v) for k, v in headers if k.startswith(b"x-ratelimit-")} == {
            (b"x-ratelimit-limit-requests", b"3"), (b"x-ratelimit-remaining-requests", b"0"),
            (b"x-ratelimit-reset-requests", wait)}

    _run(kind, url, main)


def test_tpm_holds_across_replicas_with_retry_after(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(tpm=600)  # refills 10 tokens a second
        t = await a.admit(key, 600)
        assert t.remaining_tokens == 0
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 100)
        assert info.value.retry_after == 10.0  # 100 tokens at 10/s
        headers = dict(info.value.headers())
        assert headers[b"x-ratelimit-limit-tokens"] == b"600" and headers[b"x-ratelimit-reset-tokens"] == b"10s"
        assert headers[b"x-ratelimit-remaining-tokens"] in (b"0", b"1")  # (what refilled meanwhile)
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 601)  # can never fit: no point retrying
        assert info.value.error_code == "request_too_large"
        headers = dict(render(info.value)[1])
        assert headers[b"x-should-retry"] == b"false" and b"retry-after" not in headers
        assert headers[b"x-ratelimit-limit-tokens"] == b"600"
        assert headers[b"x-ratelimit-remaining-tokens"] in (b"0", b"1")

    _run(kind, url, main)


def test_concurrency_holds_across_replicas(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(max_concurrent=2)
        ta, tb = await a.admit(key, 1), await b.admit(key, 1)
        for lim in (a, b):
            with pytest.raises(RateLimited) as info:
                await lim.admit(key, 1)
            assert info.value.error_code == "concurrency_limit_exceeded" and info.value.retry_after == 1.0
        await b.settle(tb, 1)
        await b.settle(tb, 1)  # twice: frees one slot, not two
        tc = await a.admit(key, 1)
        with pytest.raises(RateLimited):
            await b.admit(key, 1)
        await a.settle(ta, 1)
        await a.settle(tc, 1)

    _run(kind, url, main)


def test_settle_gives_back_unused_tokens_and_charges_overuse(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(tpm=1200)  # 20 tokens a second
        t = await a.admit(key, 800)
        await a.settle(t, 100)  # used less: 700 back
        t = await b.admit(key, 800)
        assert t.remaining_tokens is not None and 300 <= t.remaining_tokens <= 302
        await b.settle(t, 1000)  # used more: 200 more charged
        assert t.settled
        await b.settle(t, 0)  # already settled: nothing changes
        with pytest.raises(RateLimited) as info:
            await a.admit(key, 300)  # ~100 left: 200 tokens short at 20/s
        assert info.value.retry_after == 10.0

    _run(kind, url, main)


def test_aborted_stream_settles_with_the_tokens_actually_streamed(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(tpm=1000, max_concurrent=1)
        streamed = 0
        started = asyncio.Event()

        async def serve() -> None:  # the proxy's shape: reserve, stream, settle in `finally`
            nonlocal streamed
            prompt, max_tokens = 50, 500
            ticket = await a.admit(key, prompt + max_tokens)
            try:
                while True:
                    streamed += 1
                    if streamed == 20:
                        started.set()
                    await asyncio.sleep(0.001)
            finally:
                await a.settle(ticket, prompt + streamed)

        task = asyncio.create_task(serve())
        await started.wait()
        task.cancel()  # the client went away mid-stream
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled() and streamed >= 20
        t = await b.admit(key, 10)  # the slot is free again, and only what was streamed was charged
        assert t.remaining_tokens is not None
        assert 1000 - 50 - streamed - 10 <= t.remaining_tokens <= 1000 - 50 - streamed - 10 + 2
        await b.settle(t, 10)

    _run(kind, url, main)


def test_a_refused_request_is_charged_nothing(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=2, tpm=100)
        await a.admit(key, 90)
        with pytest.raises(RateLimited, match="tokens per minute"):
            await b.admit(key, 50)  # over tpm: must not use up an rpm slot
        t = await b.admit(key, 10)
        assert t.remaining_requests == 0 and t.remaining_tokens == 0
        assert dict(t.headers()) == {
            b"x-ratelimit-limit-requests": b"2",
            b"x-ratelimit-remaining-requests": b"0",
            b"x-ratelimit-reset-requests": b"1m0s",  # when this admission leaves the window
            b"x-ratelimit-limit-tokens": b"100",
            b"x-ratelimit-remaining-tokens": b"0",
            b"x-ratelimit-reset-tokens": b"1m0s",  # an empty bucket refills in a window
        }

    _run(kind, url, main)


def test_a_request_that_never_reached_a_worker_gives_its_budget_back(kind: str, url: str) -> None:
    """Admitted, then refused by the gateway's own admission queue: its rpm place, tokens and slot all come back."""
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=2, tpm=100, max_concurrent=1)
        t = await a.admit(key, 60)
        await a.settle(t, 0, unsent=True)
        t = await b.admit(key, 60)  # its slot and tokens are back
        assert t.remaining_requests == 1 and t.remaining_tokens is not None and 40 <= t.remaining_tokens <= 41
        await b.settle(t, 60)  # served: it keeps its place in the window
        t = await a.admit(key, 1)
        assert t.remaining_requests == 0
        await a.settle(t, 1)
        with pytest.raises(RateLimited, match="requests per minute"):
            await b.admit(key, 1)

    _run(kind, url, main)


def test_every_429_carries_both_units_headers_as_openai_sends_them(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=2, tpm=100, max_concurrent=1)
        held = await a.admit(key, 30)
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 10)  # the one slot is taken
        got = dict(info.value.headers())
        assert info.value.error_code == "concurrency_limit_exceeded" and got[b"retry-after"] == b"1"
        assert (got[b"x-ratelimit-limit-requests"], got[b"x-ratelimit-remaining-requests"]) == (b"2", b"1")
        assert got[b"x-ratelimit-reset-requests"] == b"1m0s"
        assert got[b"x-ratelimit-limit-tokens"] == b"100" and got[b"x-ratelimit-remaining-tokens"] in (b"70", b"71")
        assert got[b"x-ratelimit-reset-tokens"] == b"18s"  # 30 tokens at 100 a minute
        await a.settle(held, 30)
        await a.settle(await a.admit(key, 10), 10)
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 10)  # the minute's two requests are used
        got = dict(info.value.headers())
        assert info.value.error_code == "rate_limit_exceeded" and got[b"x-ratelimit-remaining-requests"] == b"0"
        assert got[b"x-ratelimit-remaining-tokens"] in (b"59", b"60", b"61")  # the other unit too

    _run(kind, url, main)


def test_unlimited_keys_are_not_metered(kind: str, url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        for _ in range(50):
            t = await a.admit(OPEN, 10**9)
            assert not t.metered and t.headers() == []
            await b.settle(t, 10**9)

    _run(kind, url, main)


def test_memory_windows_slide_with_the_clock() -> None:
    now = [1000.0]
    lim = MemoryLimiter(clock=lambda: now[0])

    async def main() -> None:
        key = _key(rpm=3, tpm=600)
        for at in (0.0, 10.0, 20.0):
            now[0] = 1000.0 + at
            await lim.settle(await lim.admit(key, 1), 1)
        now[0] = 1030.0
        with pytest.raises(RateLimited) as info:
            await lim.admit(key, 1)
        assert info.value.retry_after == 30.0
        now[0] = 1059.5
        with pytest.raises(RateLimited) as info:
            await lim.admit(key, 1)
        assert info.value.retry_after == 1.0
        now[0] = 1060.0
        t = await lim.admit(key, 600)  # the first left the window; the bucket is full again
        assert t.remaining_requests == 0 and t.remaining_tokens == 0
        now[0] = 1060.5
        with pytest.raises(RateLimited) as info:
            await lim.admit(key, 1)  # rpm first
        now[0] = 1075.0
        with pytest.raises(RateLimited) as info:
            await lim.admit(key, 200)  # 150 refilled in 15 s: 50 short → 5 s
        assert info.value.retry_after == 5.0 and "tokens per minute" in info.value.message

    asyncio.run(main())


def test_redis_sliding_window_expires(redis_url: str) -> None:
    async def main(lim: Limiter, _: Limiter) -> None:
        key = _key(rpm=1)
        await lim.admit(key, 1)
        with pytest.raises(RateLimited) as info:
            await lim.admit(key, 1)
        assert info.value.retry_after == 1.0
        await asyncio.sleep(1.05)
        await lim.admit(key, 1)

    _run("redis", redis_url, main, window=1.0)


_HOLDER = """
import asyncio, sys
from app.limits import Limits
from app.limits_redis import RedisLimiter
from app.auth import Principal

async def main():
    lim = RedisLimiter.from_url(sys.argv[1], prefix=sys.argv[2], lease=float(sys.argv[3]))
    await lim.admit(Principal(name="crashy", limits=Limits(max_concurrent=1)), 1)
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_crashed_replica_does_not_leak_its_slots(redis_url: str) -> None:
    prefix, lease = _prefix(), 1.0
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_url, prefix, str(lease)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    freed: list[float] = []

    async def main(lim: Limiter, _: Limiter) -> None:
        key = Principal(name="crashy", limits=Limits(max_concurrent=1))
        with pytest.raises(RateLimited):
            await lim.admit(key, 1)
        while True:
            try:
                t = await lim.admit(key, 1)
                break
            except RateLimited:
                await asyncio.sleep(0.05)
        freed.append(time.monotonic() - killed)
        await lim.settle(t, 1)

    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        proc.send_signal(signal.SIGKILL)  # no settle, no cleanup, no more renewals
        proc.wait(5)
        killed = time.monotonic()
        _run("redis", redis_url, main, prefix=prefix, lease=lease)
        assert freed[0] < lease + 2.0  # freed by the lease (plus slack for a loaded machine), not never
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_live_replica_renews_its_slots(redis_url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(max_concurrent=1)
        t = await a.admit(key, 1)
        for _ in range(8):  # 3.2 s: over two leases
            await asyncio.sleep(0.4)
            with pytest.raises(RateLimited):
                await b.admit(key, 1)
        await a.aclose()  # a graceful shutdown frees what it still holds
        assert t.settled
        await b.settle(await b.admit(key, 1), 1)

    _run("redis", redis_url, main, lease=1.5)


def test_a_request_too_large_for_the_budget_is_said_so_before_any_other_limit(kind: str, url: str) -> None:
    """An rpm 429 is retried by the SDKs after its Retry-After; "too large" is not, and is what the request is."""
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=1, tpm=100, max_concurrent=1)
        await a.admit(key, 10)  # the key's one request per minute, and its one slot
        with pytest.raises(RateLimited) as info:
            await b.admit(key, 101)
        assert info.value.error_code == "request_too_large" and not info.value.retry

    _run(kind, url, main)


def test_fail_open_asks_a_stalled_redis_once_and_says_when_it_is_back(redis_url: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that takes requests and answers none (host gone, partition; here CLIENT PAUSE) cost each request
    the whole timeout before it was let through; now the first one pays it, and those after it for a second
    do not ask."""
    async def main() -> None:
        limiter = RedisLimiter.from_url(redis_url, timeout=1.0, fail_open=True)
        admin = redis.Redis.from_url(redis_url)
        key = _key(rpm=100)
        try:
            assert (await limiter.admit(key, 1)).metered
            admin.client_pause(2500)
            start = time.monotonic()
            assert not (await limiter.admit(key, 1)).metered
            first = time.monotonic() - start
            start = time.monotonic()
            assert not (await limiter.admit(key, 1)).metered
            second = time.monotonic() - start
            assert first >= 0.9 and second < 0.5, (first, second)  # the second did not wait for Redis
            await asyncio.sleep(2.0)  # the pause and the skip are over
            assert (await limiter.admit(key, 1)).metered
            back = [r.getMessage() for r in caplog.records if "rate limiter back" in r.getMessage()]
            assert len(back) == 1 and back[0].startswith("rate limiter back: 1 request(s)"), back
        finally:
            admin.close()
            await _close(limiter)

    asyncio.run(main())


def test_unreachable_redis_fails_closed_with_503_or_open_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"

    async def main() -> None:
        closed = RedisLimiter.from_url(url, timeout=0.5)
        fail_open = RedisLimiter.from_url(url, timeout=0.5, fail_open=True)
        try:
            with pytest.raises(NoWorkerAvailable) as info:
                await closed.admit(_key(rpm=1), 1)
            assert render(info.value)[0] == 503 and info.value.error_code == "rate_limiter_unavailable"
            with pytest.raises(NoWorkerAvailable):
                await closed.ping()
            t = await fail_open.admit(_key(rpm=1), 1)
            assert not t.metered
            await fail_open.settle(t, 1)
            assert not closed._voids and not fail_open._voids  # refused at connect: nothing sent, nothing to void
            for _ in range(5):
                assert not (await fail_open.admit(_key(rpm=1), 1)).metered
            said = [r.getMessage() for r in caplog.records if "admitted without" in r.getMessage()]
            assert len(said) == 1 and said[0].startswith("rate limiter unavailable, 1 request(s)"), said  # not 6
        finally:
            await _close(closed, fail_open)

    asyncio.run(main())


def test_an_admit_given_up_on_in_a_stalled_redis_takes_nothing_when_redis_resumes() -> None:
    """Redis stalls past the admit timeout (503 for the request), then resumes and runs the queued script: what that
    admit took (concurrency slot, rpm place, tokens) is given back, not held for the lease and the window."""
    with redis_server() as url:
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        prefix = _prefix()

        async def main() -> None:
            stalled = RedisLimiter.from_url(url, timeout=0.5, prefix=prefix)
            other = RedisLimiter.from_url(url, prefix=prefix)
            key = _key(rpm=2, tpm=100, max_concurrent=1)
            try:
                await stalled.settle(await stalled.admit(_key(rpm=1), 1), 1)  # the script is loaded in Redis
                held = await stalled.admit(_key(max_concurrent=1), 1)  # its heartbeat now renews every lease / 3
                os.kill(pid, signal.SIGSTOP)
                try:
                    with pytest.raises(NoWorkerAvailable):
                        await stalled.admit(key, 60)
                finally:
                    os.kill(pid, signal.SIGCONT)
                deadline = time.monotonic() + 5
                while True:
                    try:
                        t = await other.admit(key, 60)
                        break
                    except RateLimited as exc:  # the stalled admit ran, and holds the slot until it is voided
                        assert exc.error_code == "concurrency_limit_exceeded" and time.monotonic() < deadline
                        await asyncio.sleep(0.1)
                assert t.remaining_requests == 1  # its rpm place is back
                assert t.remaining_tokens is not None and 40 <= t.remaining_tokens <= 41  # and its tokens
                await other.settle(t, 60)
                await stalled.settle(held, 1)
            finally:
                await _close(stalled, other)

        asyncio.run(main())


def test_a_voided_admit_that_reaches_redis_afterwards_takes_nothing(redis_url: str) -> None:
    """The other order: the void is applied first, and the stalled admit script runs after it."""
    async def main(a: Limiter, b: Limiter) -> None:
        assert isinstance(a, RedisLimiter)
        key = _key(rpm=1, tpm=100, max_concurrent=1)
        lost = Ticket(key.name, key.limits, 60)
        a._give_up(lost)
        await a._flush_voids()
        late = await a._admit(keys=a._ticket_keys(lost), args=(1, 100, 1, 60, lost.id, 30_000, 60_000))
        assert int(late[0]) == 5  # voided
        t = await b.admit(key, 100)  # slot, rpm place and every token still there
        assert t.remaining_requests == 0 and t.remaining_tokens == 0
        await b.settle(t, 100)

    _run("redis", redis_url, main)


def test_voids_waiting_for_an_unreachable_redis_are_retried_at_a_pace() -> None:
    """No live slots, Redis refusing connections: the void is retried about once a second, not in a hot loop."""
    async def main() -> None:
        lim = RedisLimiter.from_url(f"redis://127.0.0.1:{_free_port()}/0", timeout=0.5, lease=0.3)
        attempts = 0
        flush = lim._flush_voids

        async def counted() -> bool:
            nonlocal attempts
            attempts += 1
            return await flush()

        lim._flush_voids = counted  # type: ignore[method-assign]
        key = _key(max_concurrent=1)
        lim._give_up(Ticket(key.name, key.limits, 1))
        await asyncio.sleep(2.5)
        assert 2 <= attempts <= 5, attempts
        assert lim._voids  # still owed
        await lim.aclose()

    asyncio.run(main())


def test_limits_hold_under_concurrent_load_from_two_replicas(redis_url: str) -> None:
    async def main(a: Limiter, b: Limiter) -> None:
        key = _key(rpm=25)
        results = await asyncio.gather(*[(a if i % 2 else b).admit(key, 1) for i in range(60)], return_exceptions=True)
        assert sum(isinstance(r, Ticket) for r in results) == 25
        assert all(isinstance(r, (Ticket, RateLimited)) for r in results)

    _run("redis", redis_url, main)


def test_a_redis_url_is_checked_at_start_and_with_fail_open_only_as_a_url() -> None:
    dead = f"redis://:secret@127.0.0.1:{_free_port()}/0"
    said = url_problem(dead) or ""
    assert "does not answer" in said and "secret" not in said
    assert url_problem(dead, ping=False) is None  # --redis-fail-open: the start goes on
    assert "scheme" in (url_problem("notaurl", ping=False) or "")
