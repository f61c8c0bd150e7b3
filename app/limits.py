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
A request over any limit is charged nothing; so is one admitted that never reached a worker (the gateway's own
overload, say): ``settle(..., unsent=True)`` gives back its place in the rpm window too.
``remaining_*`` on a ticket are never negative.

``MemoryLimiter`` serves one replica; ``limits_redis.RedisLimiter`` holds the limits across replicas. What both share
is here: the limits, the ticket, and the 429s they answer with.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from .errors import RateLimited, duration


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
    window: float = 60.0
    admitted_at: float = 0.0  # (MemoryLimiter: its entry in the rpm window)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits this key has, after this admission."""
        return Budget(self.limits, self.window, self.remaining_requests, self.remaining_tokens).headers()


@dataclass(frozen=True, slots=True)
class Budget:
    """What a key has left at one moment: requests in the window and tokens in the bucket (None: no such limit)."""

    limits: Limits
    window: float
    requests: int | None = None
    tokens: float | None = None

    def headers(self, *, requests_reset: float | None = None, tokens_reset: float | None = None
                ) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``. ``reset``: until the budget is whole
        again (requests: when the newest leaves the window, at most a window; tokens: when the bucket has refilled),
        or what the caller says (a 429's wait for the unit it ran out of)."""
        out: list[tuple[bytes, bytes]] = []
        rpm, tpm = self.limits.rpm, self.limits.tpm
        if rpm is not None and self.requests is not None:
            reset = self.window if requests_reset is None else requests_reset
            out += [(b"x-ratelimit-limit-requests", b"%d" % rpm),
                    (b"x-ratelimit-remaining-requests", b"%d" % max(0, self.requests)),
                    (b"x-ratelimit-reset-requests", duration(reset))]
        if tpm is not None and self.tokens is not None:
            left = max(0, math.floor(self.tokens))
            reset = (tpm - min(tpm, left)) * self.window / tpm if tokens_reset is None else tokens_reset
            out += [(b"x-ratelimit-limit-tokens", b"%d" % tpm),
                    (b"x-ratelimit-remaining-tokens", b"%d" % left),
                    (b"x-ratelimit-reset-tokens", duration(reset))]
        return out


class Limiter(Protocol):
    async def admit(self, subject: Subject, estimated_tokens: int) -> Ticket: ...

    async def settle(self, ticket: Ticket, actual_tokens: int, *, unsent: bool = False) -> None:
        """Charge the real usage and free the concurrency slot. Call it exactly once, also for failed and aborted
        requests (with the tokens actually streamed); a second call does nothing. ``unsent``: the request never
        reached a worker, and no longer counts as one of the key's requests per minute."""

    async def aclose(self) -> None: ...


def unmetered(subject: Subject, estimated: int) -> Ticket:
    return Ticket(subject.name, subject.limits, estimated, id="", metered=False)


def _seconds(value: float) -> float:
    # whole seconds, rounded up: a client that waits Retry-After must find the budget there
    return float(max(1, math.ceil(value - 1e-9)))


def _over(name: str, what: str, detail: str, wait: float, headers: list[tuple[bytes, bytes]]) -> RateLimited:
    s = _seconds(wait)
    msg = f"Rate limit reached for API key '{name}' on {what} per minute: {detail}. Please try again in {s:.0f}s."
    return RateLimited(msg, retry_after=s, rate_headers=headers)


def over_requests(name: str, budget: Budget, wait: float) -> RateLimited:
    headers = replace(budget, requests=0).headers(requests_reset=_seconds(wait))
    return _over(name, "requests", f"limit {budget.limits.rpm}", wait, headers)


def over_tokens(name: str, budget: Budget, needed: int, wait: float) -> RateLimited:
    have = max(0, math.floor(budget.tokens or 0))
    detail = f"limit {budget.limits.tpm}, requested {needed}, {have} left"
    return _over(name, "tokens", detail, wait, budget.headers(tokens_reset=_seconds(wait)))


def too_large(name: str, budget: Budget, needed: int) -> RateLimited:
    """No wait makes such a request fit: no Retry-After, and ``x-should-retry: false`` (the SDKs' own retries)."""
    msg = (
        f"Request too large for API key '{name}': it may use up to {needed} tokens (prompt + max_tokens), above "
        f"its limit of {budget.limits.tpm} tokens per minute. Lower max_tokens or shorten the prompt."
    )
    return RateLimited(msg, code="request_too_large", rate_headers=budget.headers(), retry=False)


def too_many_concurrent(name: str, budget: Budget) -> RateLimited:
    limit = budget.limits.max_concurrent
    msg = f"API key '{name}' already has {limit} requests in flight, its limit. Please retry when one finishes."
    return RateLimited(msg, retry_after=1.0, code="concurrency_limit_exceeded", rate_headers=budget.headers())


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
            return unmetered(subject, estimated_tokens)
        now = self._clock()
        st = self._state(name, limits, now)
        if limits.rpm is not None:
            while st.requests and st.requests[0] <= now - self.window:
                st.requests.popleft()
        budget = Budget(limits, self.window, None if limits.rpm is None else limits.rpm - len(st.requests),
                        None if limits.tpm is None else st.tokens)
        if limits.tpm is not None and estimated_tokens > limits.tpm:  # first: no wait cures it (no retry)
            raise too_large(name, budget, estimated_tokens)
        if limits.max_concurrent is not None and st.active >= limits.max_concurrent:
            raise too_many_concurrent(name, budget)
        if limits.rpm is not None and len(st.requests) >= limits.rpm:
            raise over_requests(name, budget, st.requests[-limits.rpm] + self.window - now)
        if limits.tpm is not None:
            if st.tokens < estimated_tokens:
                wait = (estimated_tokens - st.tokens) * self.window / limits.tpm
                raise over_tokens(name, budget, estimated_tokens, wait)
            st.tokens -= estimated_tokens
        if limits.rpm is not None:
            st.requests.append(now)
        st.active += 1
        left_requests = None if limits.rpm is None else limits.rpm - len(st.requests)
        left_tokens = None if limits.tpm is None else math.floor(st.tokens)
        return Ticket(name, limits, estimated_tokens, remaining_requests=left_requests, remaining_tokens=left_tokens,
                      window=self.window, admitted_at=now)

    async def settle(self, ticket: Ticket, actual_tokens: int, *, unsent: bool = False) -> None:
        done, ticket.settled = ticket.settled, True
        if done or not ticket.metered:
            return
        st = self._state(ticket.key, ticket.limits, self._clock())
        st.active -= 1
        if unsent and ticket.limits.rpm is not None:
            with contextlib.suppress(ValueError):  # (already out of the window)
                st.requests.remove(ticket.admitted_at)
        if ticket.limits.tpm is not None:
            st.tokens = min(float(ticket.limits.tpm), st.tokens + ticket.reserved - actual_tokens)

    async def aclose(self) -> None:
        self._keys.clear()
