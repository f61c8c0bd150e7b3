"""Per-key limits held across gateway replicas in Redis (the rules: ``limits``).

One atomic Lua script per admit/settle, Redis's own clock, and concurrency slots as leases a live replica renews —
a crashed replica's slots expire after ``lease`` seconds instead of leaking forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import NoWorkerAvailable
from .limits import Budget, Subject, Ticket, over_requests, over_tokens, too_large, too_many_concurrent, unmetered

log = logging.getLogger("tokengate.limits")

_VOID_RETRY = 1.0  # seconds between attempts to void the admits given up on
_MAX_VOIDS = 1_000
# fail_open: an outage is logged at most this often (seconds), with the count of requests it let through
_SAY_EVERY = 10.0
_SKIP_FOR = 1.0  # after a failure, seconds its requests are admitted unmetered without asking Redis


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

# KEYS: rpm zset, tpm hash, concurrency zset, the ticket's void mark. ARGV: rpm, tpm, max_concurrent (0: none),
# estimate, ticket id, lease ms, window ms. Returns {status, retry ms, requests left, tokens left} (what is left
# after an admission, or at a refusal; meaningless for a limit the key lacks); status 0 admitted, 1 concurrency,
# 2 rpm, 3 tpm, 4 too large, 5 voided (given up on before it ran).
_ADMIT = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {5, 0, -1, -1} end
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local est, id, lease, window = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local used, tokens = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  used = redis.call('ZCARD', KEYS[1])
end
if tpm > 0 then tokens = bucket(KEYS[2], tpm, window) end
local left = rpm - used
if tpm > 0 and est > tpm then return {4, 0, left, math.floor(tokens)} end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= conc then return {1, 1000, left, math.floor(tokens)} end
end
if rpm > 0 and used >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], used - rpm, used - rpm, 'WITHSCORES')
  return {2, math.ceil(tonumber(oldest[2]) + window - now), 0, math.floor(tokens)}
end
if tpm > 0 then
  if tokens < est then return {3, math.ceil((est - tokens) * window / tpm), left, math.floor(tokens)} end
  tokens = tokens - est
  store(KEYS[2], tokens, tpm, window)
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window))
  left = left - 1
end
if conc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('PEXPIRE', KEYS[3], math.ceil(2 * lease))
end
return {0, 0, left, math.floor(tokens)}
"""

# KEYS: rpm zset, tpm hash, concurrency zset. ARGV: tpm (0: none), reserved - actual, ticket id, window ms, whether
# the request holds a slot ('1'), whether it never reached a worker ('1': it leaves the rpm window).
_SETTLE = """
local id = ARGV[3]
if ARGV[5] == '1' then redis.call('ZREM', KEYS[3], id) end
if ARGV[6] == '1' then redis.call('ZREM', KEYS[1], id) end
local tpm, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if tpm > 0 and delta ~= 0 then store(KEYS[2], math.min(tpm, bucket(KEYS[2], tpm, window) + delta), tpm, window) end
return 1
"""

# KEYS: rpm zset, tpm hash, concurrency zset, the ticket's void mark. ARGV: tpm (0: none), estimate, ticket id,
# window ms, mark ms. For an admit the gateway gave up on (Redis stalled past the timeout, or the request was
# cancelled) that may still run, or may have run: the mark stops it from running later; if it ran, what it took is
# given back. (A key with only a tpm leaves no trace of an admit, so its reservation refills with the bucket.)
_VOID = """
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
local ran = redis.call('ZREM', KEYS[3], ARGV[3]) + redis.call('ZREM', KEYS[1], ARGV[3])
local tpm, est, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if ran > 0 and tpm > 0 then store(KEYS[2], math.min(tpm, bucket(KEYS[2], tpm, window) + est), tpm, window) end
return ran
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
        self._void = client.register_script(_LUA_LIB + _VOID)
        self._live: dict[str, Ticket] = {}  # tickets holding a concurrency slot, renewed by the heartbeat
        self._voids: dict[str, Ticket] = {}  # admits given up on, voided by the heartbeat once Redis answers
        self._heartbeat: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()  # wakes the heartbeat: a void to send, or aclose()
        self._poke_for_void = False
        self._closing = False
        # fail_open: what Redis last failed with (None: it answers), when that was last logged, requests admitted
        # unmetered since, and until when Redis is not asked (a black-holed one would cost each request its timeout)
        self._outage: BaseException | None = None
        self._said_at = -math.inf
        self._unmetered = 0
        self._skip_until = 0.0

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0, **kwargs: Any) -> RedisLimiter:
        # no retries: a re-sent admit would reserve twice, and one that failed "connecting" would not be voided
        client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0))
        return cls(client, owns_client=True, **kwargs)

    def _keys(self, name: str) -> list[str]:  # one hash slot per key name (Redis Cluster)
        return [f"{self.prefix}:{{{name}}}:{kind}" for kind in ("rpm", "tpm", "conc")]

    def _ticket_keys(self, ticket: Ticket) -> list[str]:
        return [*self._keys(ticket.key), f"{self.prefix}:{{{ticket.key}}}:void:{ticket.id}"]

    async def ping(self) -> None:
        """Fail fast at startup when Redis is unreachable."""
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def admit(self, subject: Subject, estimated_tokens: int) -> Ticket:
        limits, name = subject.limits, subject.name
        if limits.unlimited:
            return unmetered(subject, estimated_tokens)
        if self._outage is not None and time.monotonic() < self._skip_until:  # (fail_open, Redis just failed)
            self._say_unmetered(self._outage)
            return unmetered(subject, estimated_tokens)
        ticket = Ticket(name, limits, estimated_tokens, window=self.window)
        counts = (limits.rpm or 0, limits.tpm or 0, limits.max_concurrent or 0, estimated_tokens)
        args = (*counts, ticket.id, self.lease * 1000, self.window * 1000)
        try:
            status, retry_ms, left_requests, left_tokens = await self._admit(keys=self._ticket_keys(ticket), args=args)
        except (RedisError, OSError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) or "connecting to" not in str(exc):
                self._give_up(ticket)  # the script may be queued in a stalled Redis, or ran and its answer is lost
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not self.fail_open:
                raise _unavailable(exc) from exc
            self._skip_until = time.monotonic() + _SKIP_FOR
            self._say_unmetered(exc)
            return unmetered(subject, estimated_tokens)
        if self._outage is not None:
            log.warning("rate limiter back: %d request(s) admitted without their keys' limits since last said",
                        self._unmetered)
            self._outage, self._said_at, self._unmetered = None, -math.inf, 0
        wait = int(retry_ms) / 1000
        budget = Budget(limits, self.window, None if limits.rpm is None else int(left_requests),
                        None if limits.tpm is None else int(left_tokens))
        if status == 1:
            raise too_many_concurrent(name, budget)
        if status == 2:
            raise over_requests(name, budget, wait)
        if status == 3:
            raise over_tokens(name, budget, estimated_tokens, wait)
        if status == 4:
            raise too_large(name, budget, estimated_tokens)
        if status != 0:  # (5: voided, which only an admit given up on can meet)
            raise _unavailable(RuntimeError(f"admit status {status}"))
        ticket.remaining_requests = budget.requests
        ticket.remaining_tokens = None if budget.tokens is None else int(budget.tokens)
        if limits.max_concurrent is not None:
            self._live[ticket.id] = ticket
            self._start_heartbeat()
        return ticket

    def _say_unmetered(self, exc: BaseException) -> None:
        """Log the outage at most once per ``_SAY_EVERY`` seconds, with how many requests went unmetered meanwhile
        (one line per request would be a log flood at the moment the logs matter), and its end (``admit``)."""
        self._outage = exc
        self._unmetered += 1
        now = time.monotonic()
        if now - self._said_at >= _SAY_EVERY:
            log.warning("rate limiter unavailable, %d request(s) admitted without their keys' limits "
                        "(--redis-fail-open): %s", self._unmetered, exc)
            self._said_at, self._unmetered = now, 0

    def _give_up(self, ticket: Ticket) -> None:
        if len(self._voids) >= _MAX_VOIDS:  # a long outage: the oldest lapse with their leases and the window
            del self._voids[next(iter(self._voids))]
        self._voids[ticket.id] = ticket
        self._start_heartbeat()
        self._poke_for_void = True
        self._poke.set()  # (a void should not wait for the slots' next renewal, nor a retry's pause)

    def _start_heartbeat(self) -> None:
        if self._closing:
            return
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="limits-heartbeat")

    async def settle(self, ticket: Ticket, actual_tokens: int, *, unsent: bool = False) -> None:
        done, ticket.settled = ticket.settled, True
        if done or not ticket.metered:
            return
        self._live.pop(ticket.id, None)  # a slot we fail to free here lapses with its lease
        limits = ticket.limits
        slot = limits.max_concurrent is not None
        leaves = unsent and limits.rpm is not None
        if not slot and not leaves and (limits.tpm is None or ticket.reserved == actual_tokens):
            return
        keys = self._keys(ticket.key)
        args = (limits.tpm or 0, ticket.reserved - actual_tokens, ticket.id, self.window * 1000, int(slot), int(leaves))
        # shielded: a cancelled request (client gone, shutdown) must still give its slot and tokens back
        call = asyncio.ensure_future(self._settle(keys=keys, args=args))
        call.add_done_callback(_log_failure)
        with contextlib.suppress(RedisError, OSError):
            await asyncio.shield(call)

    async def _beat(self) -> None:
        # stopped by a flag, never cancelled: redis-py can lose a cancellation mid-command (redis-py#2028, #2551)
        now = time.monotonic()
        renew_at, void_at = now + self.lease / 3, now
        while (self._live or self._voids) and not self._closing:
            due = min(renew_at, void_at) if self._voids else renew_at
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, due - time.monotonic()))
            self._poke.clear()
            if self._closing:
                return
            now = time.monotonic()
            if self._voids and (now >= void_at or self._poke_for_void):
                self._poke_for_void = False
                if not await self._flush_voids():
                    void_at = time.monotonic() + _VOID_RETRY  # Redis still away: not again at once
            if now < renew_at:
                continue
            renew_at = now + self.lease / 3
            tickets = list(self._live.values())
            if not tickets:
                continue
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for t in tickets:
                        await self._renew(keys=[self._keys(t.key)[2]], args=[t.id, self.lease * 1000], client=pipe)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("rate limiter: could not renew %d concurrency slots: %s", len(tickets), exc)

    async def _flush_voids(self) -> bool:
        tickets = list(self._voids.values())
        mark = int(2 * max(self.window, self.lease) * 1000)  # outlives any admit still queued behind a stall
        try:
            await self.client.ping()  # (Redis still away: no pipeline of every void built for nothing)
            async with self.client.pipeline(transaction=False) as pipe:
                for t in tickets:
                    args = (t.limits.tpm or 0, t.reserved, t.id, self.window * 1000, mark)
                    await self._void(keys=self._ticket_keys(t), args=args, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("rate limiter: could not void %d unanswered admits yet: %s", len(tickets), exc)
            return False
        for t in tickets:
            self._voids.pop(t.id, None)
        return True

    async def aclose(self) -> None:
        self._closing = True
        self._poke.set()
        if self._heartbeat is not None:
            await self._heartbeat
        for ticket in list(self._live.values()):
            await self.settle(ticket, ticket.reserved)
        if self._voids:
            await self._flush_voids()
        if self._owns:
            await self.client.aclose()


def url_problem(url: str, *, ping: bool = True) -> str | None:
    """Why the limits' Redis can't be used, in one line (its password left out), or None when it answers a PING
    (``ping=False``: when the URL is one). Synchronous: for the start of ``tokengate serve``, before any loop."""
    async def check() -> None:
        limiter = RedisLimiter.from_url(url)
        try:
            if ping:
                await limiter.ping()
        finally:
            await limiter.aclose()

    try:
        asyncio.run(check())
    except ValueError as exc:  # not a Redis URL
        return str(exc)
    except NoWorkerAvailable as exc:  # ping's "unavailable", raised from what Redis said
        parts = urlsplit(url)
        where = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        return f"Redis at {where} does not answer: {exc.__cause__ or exc}"
    return None


def _unavailable(exc: BaseException) -> NoWorkerAvailable:
    msg = f"rate limiter unavailable: {type(exc).__name__}"
    return NoWorkerAvailable(msg, retry_after=1, code="rate_limiter_unavailable")


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("rate limiter: could not settle a request: %s", fut.exception())
