"""Per-key rate limits: requests per minute, tokens per minute, concurrent requests → 429 with Retry-After.

    ticket = await limiter.admit(principal, estimated_tokens)   # RateLimited (429) when over a limit
    try:
        ...                                                      # serve the request
    finally:
        await limiter.settle(ticket, actual_tokens)             # prompt + completion actually used

The rules, the same in both implementations:
- rpm: a sliding window — at most ``rpm`` admissions in any ``window`` (60 s). Retry-After: until the oldest of
  them leaves the window.
- tpm: a token bucket of ``tpm`` tokens refilled at ``tpm`` per window. ``admit`` reserves the estimate (prompt +
  max_tokens); ``settle`` gives back what was not used or charges what was used beyond it (the bucket may go into
  debt). Retry-After: until the bucket holds the estimate. An estimate above ``tpm`` can never fit: 429 at once.
- max_concurrent: admitted and not yet settled. Retry-After: 1 s (a slot frees when some request ends).
A request over any limit is charged nothing. ``remaining_*`` on a ticket are never negative.

``MemoryLimiter`` serves one replica. ``RedisLimiter`` holds the limits across replicas: one atomic Lua script per
admit/settle, Redis's own clock, and concurrency slots as leases a live replica renews — a crashed replica's slots
expire after ``lease`` seconds instead of leaking forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .errors import NoWorkerAvailable, RateLimited

log = logging.getLogger("tokengate.limits")


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None and self.max_concurrent is None


UNLIMITED = Limits()


class Subject(Protocol):
    """What a limiter needs of the caller (auth.Principal is one)."""

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> Limits: ...


@dataclass(slots=True, eq=False)
class Ticket:
    """One admitted request. ``remaining_*``: what is left after this admission (None: no such limit)."""

    key: str
    limits: Limits
    reserved: int
    id: str = field(default_factory=lambda: os.urandom(8).hex())
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    settled: bool = False
    metered: bool = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits this key has."""
        out: list[tuple[bytes, bytes]] = []
        pairs = (
            (b"requests", self.limits.rpm, self.remaining_requests),
            (b"tokens", self.limits.tpm, self.remaining_tokens),
        )
        for unit, limit, left in pairs:
            if limit is not None and left is not None:
                out += [(b"x-ratelimit-limit-" + unit, b"%d" % limit), (b"x-ratelimit-remaining-" + unit, b"%d" % left)]
        return out


class Limiter(Protocol):
    async def admit(self, subject: Subject, estimated_tokens: int) -> Ticket: ...

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        """Charge the real usage and free the concurrency slot. Call it exactly once, also for failed and aborted
        requests (with the tokens actually streamed); a second call does nothing."""

    async def aclose(self) -> None: ...


def _unmetered(subject: Subject, estimated: int) -> Ticket:
    return Ticket(subject.name, subject.limits, estimated, id="", metered=False)


def _seconds(value: float) -> float:
    # whole seconds, rounded up: a client that waits Retry-After must find the budget there
    return float(max(1, math.ceil(value - 1e-9)))


def _over(name: str, what: str, detail: str, wait: float, limit: int, left: int) -> RateLimited:
    s = _seconds(wait)
    msg = f"Rate limit reached for API key '{name}' on {what} per minute: {detail}. Please try again in {s:.0f}s."
    return RateLimited(msg, retry_after=s, limit=(what, limit, left))


def _tokens_detail(tpm: int, needed: int, left: float) -> str:
    return f"limit {tpm}, requested {needed}, {max(0, math.floor(left))} left"


def _too_large(name: str, tpm: int, needed: int, window: float) -> RateLimited:
    msg = (
        f"Request too large for API key '{name}': it may use up to {needed} tokens (prompt + max_tokens), above "
        f"its limit of {tpm} tokens per minute. Lower max_tokens or shorten the prompt."
    )
    return RateLimited(msg, retry_after=_seconds(window), code="request_too_large")


def _too_many_concurrent(name: str, limit: int) -> RateLimited:
    msg = f"API key '{name}' already has {limit} requests in flight, its limit. Please retry when one finishes."
    return RateLimited(msg, retry_after=1.0, code="concurrency_limit_exceeded")


@dataclass(slots=True)
class _KeyState:
    tokens: float
    stamp: float
    requests: deque[float] = field(default_factory=deque)
    active: int = 0


class MemoryLimiter:
    """Limits for one replica, in process memory. ``clock`` and ``window`` are injectable for tests."""

    def __init__(self, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, name: str, limits: Limits, now: float) -> _KeyState:
        st = self._keys.get(name)
        if st is None:
            st = self._keys[name] = _KeyState(tokens=float(limits.tpm or 0), stamp=now)
        elif limits.tpm is not None:  # refill
            st.tokens = min(float(limits.tpm), st.tokens + (now - st.stamp) * limits.tpm / self.window)
            st.stamp = now
        return st

    async def admit(self, subject: Subject, estimated_tokens: int) -> Ticket:
        limits, name = subject.limits, subject.name
        if limits.unlimited:
            return _unmetered(subject, estimated_tokens)
        now = self._clock()
        st = self._state(name, limits, now)
        if limits.max_concurrent is not None and st.active >= limits.max_concurrent:
            raise _too_many_concurrent(name, limits.max_concurrent)
        if limits.rpm is not None:
            while st.requests and st.requests[0] <= now - self.window:
                st.requests.popleft()
            if len(st.requests) >= limits.rpm:
                raise _over(name, "requests", f"limit {limits.rpm}", st.requests[-limits.rpm] + self.window - now,
                            limits.rpm, 0)
        if limits.tpm is not None:
            if estimated_tokens > limits.tpm:
                raise _too_large(name, limits.tpm, estimated_tokens, self.window)
            if st.tokens < estimated_tokens:
                wait = (estimated_tokens - st.tokens) * self.window / limits.tpm
                raise _over(name, "tokens", _tokens_detail(limits.tpm, estimated_tokens, st.tokens), wait, limits.tpm,
                            math.floor(st.tokens))
            st.tokens -= estimated_tokens
        if limits.rpm is not None:
            st.requests.append(now)
        st.active += 1
        left_requests = None if limits.rpm is None else limits.rpm - len(st.requests)
        left_tokens = None if limits.tpm is None else math.floor(st.tokens)
        return Ticket(name, limits, estimated_tokens, remaining_requests=left_requests, remaining_tokens=left_tokens)

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        done, ticket.settled = ticket.settled, True
        if done or not ticket.metered:
            return
        st = self._state(ticket.key, ticket.limits, self._clock())
        st.active -= 1
        if ticket.limits.tpm is not None:
            st.tokens = min(float(ticket.limits.tpm), st.tokens + ticket.reserved - actual_tokens)

    async def aclose(self) -> None:
        self._keys.clear()


# Shared by the scripts: Redis's clock in ms (one clock for every replica) and the token bucket's state.
_LUA_LIB = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function bucket(key, tpm, window)
  local st = redis.call('HMGET', key, 'tokens', 'ts')
  if st[1] == false then return tpm end
  return math.min(tpm, tonumber(st[1]) + (now - tonumber(st[2])) * tpm / window)
end
local function store(key, tokens, tpm, window)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil((tpm - tokens) * window / tpm) + 1000)
end
"""

# KEYS: rpm zset, tpm hash, concurrency zset. ARGV: rpm, tpm, max_concurrent (0: none), estimate, ticket id,
# lease ms, window ms. Returns {status, retry ms, remaining requests, remaining tokens}; status 0 admitted,
# 1 concurrency, 2 rpm, 3 tpm, 4 too large. Remaining -1: no such limit.
_ADMIT = """
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local est, id, lease, window = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {1, 1000, -1, -1} end
end
local used = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  used = redis.call('ZCARD', KEYS[1])
  if used >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], used - rpm, used - rpm, 'WITHSCORES')
    return {2, math.ceil(tonumber(oldest[2]) + window - now), 0, -1}
  end
end
local tokens = -1
if tpm > 0 then
  tokens = bucket(KEYS[2], tpm, window)
  if est > tpm then return {4, math.ceil(window), -1, math.floor(tokens)} end
  if tokens < est then return {3, math.ceil((est - tokens) * window / tpm), -1, math.floor(tokens)} end
  tokens = tokens - est
  store(KEYS[2], tokens, tpm, window)
  tokens = math.floor(tokens)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window))
  used = rpm - used - 1
else used = -1 end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('PEXPIRE', KEYS[3], math.ceil(2 * lease))
end
return {0, 0, used, tokens}
"""

# KEYS: tpm hash, concurrency zset. ARGV: tpm (0: none), reserved - actual, ticket id ('' : no slot), window ms.
_SETTLE = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if tpm > 0 and delta ~= 0 then store(KEYS[1], math.min(tpm, bucket(KEYS[1], tpm, window) + delta), tpm, window) end
return 1
"""

# KEYS: concurrency zset. ARGV: ticket id, lease ms. Extends a live slot's lease; a lapsed slot stays gone.
_RENEW = """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * tonumber(ARGV[2])))
end
return 1
"""


class RedisLimiter:
    """Limits shared by every replica that uses the same Redis (≥ 5; Redis Cluster works: one hash slot per key).

        limiter = RedisLimiter.from_url(settings.redis_url)     # in the lifespan; ``await limiter.aclose()`` after

    ``lease``: seconds a concurrency slot survives without renewal (live replicas renew every ``lease / 3``).
    ``fail_open``: when Redis cannot be reached, admit unmetered (logged) instead of answering 503.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "tokengate",
        window: float = 60.0,
        lease: float = 30.0,
        fail_open: bool = False,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.window = window
        self.lease = lease
        self.fail_open = fail_open
        self._owns = owns_client
        self._admit = client.register_script(_LUA_LIB + _ADMIT)
        self._settle = client.register_script(_LUA_LIB + _SETTLE)
        self._renew = client.register_script(_LUA_LIB + _RENEW)
        self._live: dict[str, Ticket] = {}  # tickets holding a concurrency slot, renewed by the heartbeat
        self._heartbeat: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0, **kwargs: Any) -> RedisLimiter:
        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(client, owns_client=True, **kwargs)

    def _keys(self, name: str) -> list[str]:  # one hash slot per key name (Redis Cluster)
        return [f"{self.prefix}:{{{name}}}:{kind}" for kind in ("rpm", "tpm", "conc")]

    async def ping(self) -> None:
        """Fail fast at startup when Redis is unreachable."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def admit(self, subject: Subject, estimated_tokens: int) -> Ticket:
        limits, name = subject.limits, subject.name
        if limits.unlimited:
            return _unmetered(subject, estimated_tokens)
        ticket = Ticket(name, limits, estimated_tokens)
        counts = (limits.rpm or 0, limits.tpm or 0, limits.max_concurrent or 0, estimated_tokens)
        args = (*counts, ticket.id, self.lease * 1000, self.window * 1000)
        try:
            status, retry_ms, left_requests, left_tokens = await self._admit(keys=self._keys(name), args=args)
        except (RedisError, OSError) as exc:
            if not self.fail_open:
                raise _unavailable(exc) from exc
            log.warning("rate limiter unavailable, admitting %r unmetered: %s", name, exc)
            return _unmetered(subject, estimated_tokens)
        wait = int(retry_ms) / 1000
        if status == 1:
            raise _too_many_concurrent(name, limits.max_concurrent or 0)
        if status == 2:
            raise _over(name, "requests", f"limit {limits.rpm}", wait, limits.rpm or 0, 0)
        if status == 3:
            raise _over(name, "tokens", _tokens_detail(limits.tpm or 0, estimated_tokens, int(left_tokens)), wait,
                        limits.tpm or 0, int(left_tokens))
        if status == 4:
            raise _too_large(name, limits.tpm or 0, estimated_tokens, self.window)
        ticket.remaining_requests = None if int(left_requests) < 0 else int(left_requests)
        ticket.remaining_tokens = None if limits.tpm is None else int(left_tokens)
        if limits.max_concurrent is not None:
            self._live[ticket.id] = ticket
            if self._heartbeat is None or self._heartbeat.done():
                self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="limits-heartbeat")
        return ticket

    async def settle(self, ticket: Ticket, actual_tokens: int) -> None:
        done, ticket.settled = ticket.settled, True
        if done or not ticket.metered:
            return
        self._live.pop(ticket.id, None)  # a slot we fail to free here lapses with its lease
        slot = ticket.id if ticket.limits.max_concurrent is not None else ""
        if not slot and (ticket.limits.tpm is None or ticket.reserved == actual_tokens):
            return
        keys = self._keys(ticket.key)[1:]
        args = (ticket.limits.tpm or 0, ticket.reserved - actual_tokens, slot, self.window * 1000)
        # shielded: a cancelled request (client gone, shutdown) must still give its slot and tokens back
        call = asyncio.ensure_future(self._settle(keys=keys, args=args))
        call.add_done_callback(_log_failure)
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(call)

    async def _beat(self) -> None:
        # stopped by an event, never cancelled: redis-py can lose a cancellation mid-command (redis-py#2028, #2551)
        while self._live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.lease / 3)
                return  # aclose()
            tickets = list(self._live.values())
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for t in tickets:
                        await self._renew(keys=[self._keys(t.key)[2]], args=[t.id, self.lease * 1000], client=pipe)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("rate limiter: could not renew %d concurrency slots: %s", len(tickets), exc)

    async def aclose(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            await self._heartbeat
        for ticket in list(self._live.values()):
            await self.settle(ticket, ticket.reserved)
        if self._owns:
            await self.client.aclose()


def _unavailable(exc: BaseException) -> NoWorkerAvailable:
    msg = f"rate limiter unavailable: {type(exc).__name__}"
    return NoWorkerAvailable(msg, retry_after=1, code="rate_limiter_unavailable")


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("rate limiter: could not settle a request: %s", fut.exception())
