"""A cheap asyncio load client for OpenAI-style streaming endpoints: keep-alive HTTP/1.1 over a Protocol + httptools.

Closed loop: C connections, each sending its next request when the previous one ends, for D seconds or N requests
in all.  Open loop: Poisson arrivals at R req/s (connections are pooled and opened on demand).  Per request it
records TTFT (send -> first SSE event with non-empty content/text), end-to-end time, SSE data events, status,
error and whether ``[DONE]`` was seen; ``summarize()`` gives p50/p90/p99 and req/s.

CLI: ``python -m bench.loadclient http://127.0.0.1:8001 -c 64 -d 10 --max-tokens 16`` (``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import orjson

_CONTENT = (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"reasoning":"')
_DONE = b"data: [DONE]"
_ERROR_EVENT = b'data: {"error"'


@dataclass(slots=True)
class RequestRecord:
    start: float  # perf_counter() when the request was written
    ttft: float | None  # seconds to the first content event (first body byte for non-SSE responses)
    e2e: float
    chunks: int  # SSE data events, [DONE] not counted
    status: int
    done: bool
    error: str | None = None
    lag: float = 0.0  # open loop: how late the request was sent after its scheduled arrival

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    request: bytes  # the whole HTTP request, written as is
    stream: bool

    @classmethod
    def build(cls, url: str, body: dict[str, Any], *, path: str = "/v1/chat/completions",
              api_key: str | None = None) -> Target:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"bad URL {url!r}")
        port = parts.port or 80
        raw = orjson.dumps(body)
        head = [f"POST {path} HTTP/1.1", f"host: {parts.hostname}:{port}", "content-type: application/json",
                f"content-length: {len(raw)}", "accept: */*"]
        if api_key:
            head.append(f"authorization: Bearer {api_key}")
        return cls(parts.hostname, port, ("\r\n".join(head) + "\r\n\r\n").encode() + raw, body.get("stream") is True)


def chat_body(*, max_tokens: int = 16, stream: bool = True, include_usage: bool = False, model: str = "tiny",
              prompt: str = "Write a short poem about a quiet river under a stone bridge.") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.fut: asyncio.Future[RequestRecord] | None = None
        self._reset()

    def _reset(self) -> None:
        self.t0 = 0.0
        self.first: float | None = None
        self.events = 0
        self.done = False
        self.rest = b""
        self.status = 0
        self.sse = False
        self.body: list[bytes] = []
        self.error: str | None = None
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fut is not None and not self.fut.done():
            self._finish(f"connection closed mid-response{f': {exc}' if exc else ''}")

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(f"bad HTTP response: {exc}")
            if self.transport is not None:
                self.transport.close()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.sse = self.target.stream and self.status == 200

    def on_body(self, data: bytes) -> None:
        if not self.sse:
            if self.first is None:
                self.first = time.perf_counter()
            self.body.append(data)
            return
        buf = self.rest + data if self.rest else data
        last = buf.rfind(b"\n\n")
        if last < 0:
            self.rest = buf
            return
        self.rest = buf[last + 2:]
        complete = buf[: last + 2]
        n = complete.count(b"\n\n")
        if self.first is None:
            for ev in complete.split(b"\n\n"):
                if _has_content(ev):
                    self.first = time.perf_counter()
                    break
        if _DONE in complete:
            self.done = True
            n -= 1
        if self.error is None and _ERROR_EVENT in complete:
            i = complete.find(_ERROR_EVENT)
            self.error = "in-band error: " + complete[i + 6: complete.find(b"\n", i)].decode(errors="replace")[:300]
        self.events += n

    def on_message_complete(self) -> None:
        err = self.error
        if self.status != 200:
            err = f"HTTP {self.status}: {b''.join(self.body)[:300].decode(errors='replace')}"
        elif self.sse and not self.done and err is None:  # an in-band error event is a proper end
            err = "stream ended without [DONE]"
        self._finish(err)

    def _finish(self, error: str | None) -> None:
        fut = self.fut
        if fut is None or fut.done():
            return
        now = time.perf_counter()
        ttft = None if self.first is None else self.first - self.t0
        fut.set_result(RequestRecord(self.t0, ttft, now - self.t0, self.events, self.status, self.done, error))

    def send(self) -> asyncio.Future[RequestRecord]:
        assert self.transport is not None
        self._reset()
        self.fut = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(self.target.request)
        return self.fut

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self.transport is not None and not self.transport.is_closing()


def _has_content(ev: bytes) -> bool:
    for key in _CONTENT:
        i = ev.find(key)
        if i >= 0 and ev[i + len(key): i + len(key) + 1] != b'"':
            return True
    return False


async def _connect(target: Target) -> Connection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Connection(target), target.host, target.port)
    return proto


async def _one(conn: Connection, timeout: float) -> RequestRecord:
    fut = conn.send()
    try:
        return await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        if conn.transport is not None:
            conn.transport.close()
        return RequestRecord(conn.t0, None, time.perf_counter() - conn.t0, conn.events, conn.status, conn.done,
                             f"timeout after {timeout:g} s")


@dataclass
class LoadResult:
    records: list[RequestRecord]
    elapsed: float
    outside: list[RequestRecord] = field(default_factory=list)  # run_closed with a lead-in: outside its window
    window: float | None = None  # run_closed with a lead-in: the measured window's length (elapsed: see there)
    firsts: list[RequestRecord] = field(default_factory=list)  # run_closed: each stream's first request

    def summary(self) -> dict[str, Any]:
        return summarize(self.records, self.elapsed)

    @property
    def window_scale(self) -> float:
        """What turns CPU counted over the measured window into the CPU of ``records`` at the loop's rate
        (``run_closed``): elapsed / window; 1 for a run that is its own window."""
        return self.elapsed / self.window if self.window else 1.0


async def run_closed(target: Target, *, concurrency: int, duration: float | None = None,
                     requests: int | None = None, timeout: float = 60.0,
                     pool: list[Connection] | None = None, think: float = 0.0, lead_in: float = 0.0,
                     on_window: Callable[[], None] | None = None,
                     on_close: Callable[[], None] | None = None) -> LoadResult:
    """C closed-loop streams until ``duration`` seconds have passed or ``requests`` have been started.

    With ``pool``, connections are taken from it and given back at the end (keep-alive across runs);
    ``close_pool(pool)`` when done. ``think`` > 0: each stream waits a random 0..think seconds before each
    request (seeded per stream, so every run draws the same waits), which keeps streams of equal length from
    arriving in lock-step waves.

    ``lead_in`` > 0: the streams run that long before a measured window of ``duration`` seconds opens.  That
    leaves out the start-up transient of a closed loop: all C streams sending their first request in the same
    instant (after idle, on connections the server may have closed), in lock-step for a few rounds of requests.
    ``records`` are then the requests that completed inside the window, and the others — the lead-in's, and
    those still running when the window closed, which the streams finish before returning — are in
    ``LoadResult.outside``.  ``on_window`` / ``on_close`` are called as the window opens and closes (at the start
    and the end without a lead-in), for CPU counters over the same window; ``LoadResult.window`` is its length.

    The rate of a windowed run is the closed loop's steady rate by Little's law, C / mean time from one request's
    send to the next one's on the same stream (measured inside the window), and ``elapsed`` is the time the
    records take at that rate (records / elapsed = the rate).  Counting completions in a window of a few request
    durations is off by a whole wave while streams move in lock-step (a paced c=256 round counted 1.45x direct).
    CPU per request over the window: CPU x elapsed / window / records.  A window shorter than one request has no
    send-to-send time inside it: the rate is then the count over the window.  ``firsts`` holds each stream's first
    request (the synchronised start), windowed or not.
    """
    if duration is None and requests is None:
        raise ValueError("give duration or requests")
    windowed = lead_in > 0
    if windowed and (requests is not None or duration is None or duration <= 0):
        raise ValueError("a lead-in needs a duration > 0 and no request cap (the run could end before the window)")
    records: list[RequestRecord] = []
    outside: list[RequestRecord] = []
    firsts: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + lead_in + duration if duration is not None else float("inf")
    left = [requests if requests is not None else -1]
    inf = float("inf")
    window = [inf, inf] if windowed else [t0, inf]  # opened, closed (perf_counter); inf: not yet
    cycles: list[float] = []  # send -> next send on the same stream, both inside the window

    def open_window() -> None:
        if window[0] == inf:
            window[0] = time.perf_counter()
            if on_window is not None:
                on_window()

    def close_window() -> None:
        if window[1] == inf:
            window[1] = time.perf_counter()
            if on_close is not None:
                on_close()

    def keep(rec: RequestRecord, first: bool) -> None:
        # by when it completed, not when its task resumed: a timer due in the same loop pass runs first
        (records if window[0] <= rec.start + rec.e2e < window[1] else outside).append(rec)
        if first:
            firsts.append(rec)

    loop = asyncio.get_running_loop()
    opening = closing = None
    if windowed:
        assert duration is not None  # checked above
        opening = loop.call_later(lead_in, open_window)
        closing = loop.call_later(lead_in + duration, close_window)
    elif on_window is not None:
        on_window()

    async def worker(index: int) -> None:
        conn: Connection | None = pool.pop() if pool else None
        rng = random.Random(index)
        sent = 0.0
        first = True
        # windowed: until the window has closed, not the instant it was due (its timer may run late on a busy
        # machine; streams that stopped first would leave the window's end with no requests running)
        while (time.perf_counter() < deadline or windowed and window[1] == inf) and left[0] != 0:
            if windowed:
                now = time.perf_counter()
                if window[0] <= sent and window[1] == inf:
                    cycles.append(now - sent)
                sent = now
            left[0] -= 1
            if think > 0:
                await asyncio.sleep(rng.uniform(0.0, think))
            if conn is None or not conn.reusable:
                try:
                    conn = await _connect(target)
                except OSError as exc:
                    keep(RequestRecord(time.perf_counter(), None, 0.0, 0, 0, False, f"connect: {exc}"), first)
                    first = False
                    await asyncio.sleep(0.05)
                    continue
            keep(await _one(conn, timeout), first)
            first = False
        if conn is not None:
            if pool is not None and conn.reusable:
                pool.append(conn)
            elif conn.transport is not None:
                conn.transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    end = time.perf_counter()
    if not windowed:
        if on_close is not None:
            on_close()
        return LoadResult(records, end - t0, outside, firsts=firsts)
    for handle in (opening, closing):
        if handle is not None:
            handle.cancel()
    open_window()  # (the timers fired late, or the streams ended first: each hook still fires once, in order)
    close_window()
    length = window[1] - window[0]
    elapsed = len(records) * statistics.fmean(cycles) / concurrency if cycles else length
    return LoadResult(records, elapsed, outside, window=length, firsts=firsts)


def close_pool(pool: list[Connection]) -> None:
    for conn in pool:
        if conn.transport is not None:
            conn.transport.close()
    pool.clear()


async def run_open(target: Target, *, rate: float, duration: float, timeout: float = 60.0,
                   seed: int = 0, pool: list[Connection] | None = None, max_in_flight: int | None = None
                   ) -> LoadResult:
    """Poisson arrivals at ``rate`` req/s for ``duration`` seconds; latency is from the actual send (``lag``: how
    late that was, connecting included).  With ``pool``, idle connections come from it and are left in it.
    Arrivals while ``max_in_flight`` requests are open (default: half the open-file limit) fail at once: a target
    that can't keep up must not exhaust this process's file descriptors."""
    if max_in_flight is None:
        max_in_flight = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
    rng = random.Random(seed)
    idle: list[Connection] = pool if pool is not None else []
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        conn = None
        while idle and conn is None:
            c = idle.pop()
            conn = c if c.reusable else None
        if conn is None:
            try:
                conn = await _connect(target)
            except OSError as exc:
                records.append(RequestRecord(time.perf_counter(), None, 0.0, 0, 0, False, f"connect: {exc}"))
                return
        rec = await _one(conn, timeout)
        rec.lag = rec.start - scheduled
        records.append(rec)
        if conn.reusable:
            idle.append(conn)

    t0 = time.perf_counter()
    at = t0
    while True:
        at += rng.expovariate(rate)
        if at > t0 + duration:
            break
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_in_flight:
            records.append(RequestRecord(time.perf_counter(), None, 0.0, 0, 0, False,
                                         f"client: {max_in_flight} requests already open"))
            continue
        task = asyncio.create_task(one(at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if pool is None:
        close_pool(idle)
    return LoadResult(records, time.perf_counter() - t0)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _dist_ms(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    out = {f"p{q}": round(percentile(v, q) * 1000, 3) for q in (50, 90, 99)}
    out["mean"] = round(sum(v) / len(v) * 1000, 3) if v else float("nan")
    return out


def summarize(records: list[RequestRecord], elapsed: float) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or f"HTTP {r.status}")[:120]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "elapsed_s": round(elapsed, 3),
        "rps": round(len(ok) / elapsed, 2) if elapsed > 0 else 0.0,
        "ttft_ms": _dist_ms([r.ttft for r in ok if r.ttft is not None]),
        "e2e_ms": _dist_ms([r.e2e for r in ok]),
        "chunks_mean": round(sum(r.chunks for r in ok) / len(ok), 2) if ok else 0.0,
        "done_ratio": round(sum(r.done for r in ok) / len(ok), 4) if ok else 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Closed/open-loop load client for OpenAI streaming endpoints.")
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8001")
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("-n", "--requests", type=int, default=None, help="stop after N requests (closed loop)")
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals at this many req/s")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--include-usage", action="store_true")
    p.add_argument("--model", default="tiny")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--lead-in", type=float, default=0.0,
                   help="closed loop: run this long before measuring (leaves out the synchronised start)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    a = p.parse_args(argv)
    body = chat_body(max_tokens=a.max_tokens, stream=not a.no_stream, include_usage=a.include_usage, model=a.model)
    if a.path.endswith("/v1/completions"):
        body = {"model": a.model, "prompt": "Once upon a time", "max_tokens": a.max_tokens, "stream": not a.no_stream}
    target = Target.build(a.url, body, path=a.path, api_key=a.api_key)

    async def go() -> LoadResult:
        if a.rate is not None:
            return await run_open(target, rate=a.rate, duration=a.duration, timeout=a.timeout)
        duration = None if a.requests is not None else a.duration
        return await run_closed(target, concurrency=a.concurrency, duration=duration, requests=a.requests,
                                timeout=a.timeout, lead_in=a.lead_in)

    if a.loop == "uvloop":
        import uvloop

        result = uvloop.run(go())
    else:
        result = asyncio.run(go())
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
