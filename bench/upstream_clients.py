"""Which HTTP client should the gateway use towards its workers?  httpx vs aiohttp vs plain asyncio + httptools.

Each client, in its own process pinned to one core (CPU 0), runs 64 concurrent keep-alive streams against the fake
worker (CPU 1; zero delay, 16 tokens, ``stream: true``), reading every body byte, for ``--seconds``; rounds are
interleaved.  Reported: req/s and client CPU microseconds per request (process CPU time / requests).  ``tokengate``
(app/upstream.py's pool, the client as built) runs too when importable.

    python -m bench.upstream_clients                      # 3 rounds x 4 s per client
    python -m bench.upstream_clients --rounds 2 --seconds 3 --clients httpx,plain
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
import orjson

from bench.overhead import free_port, raise_nofile, spawn, stop, wait_http

PATH = "/v1/chat/completions"
BODY = orjson.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hello there, how are you?"}],
                     "max_tokens": 16, "stream": True})
CLIENTS = ("httpx", "httpx2", "aiohttp", "plain", "tokengate")
Fetch = Callable[[], Awaitable[int]]  # one request; returns body bytes read


class _PlainConn(asyncio.Protocol):
    """One keep-alive connection: one write per request, body bytes handed over in batches as they arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.buf: deque[bytes] = deque()
        self.complete = False
        self.closed = False
        self.keep_alive = True
        self.status = 0
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.buf.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_chunk(self) -> bytes | None:
        while True:
            if self.buf:
                data = self.buf[0] if len(self.buf) == 1 else b"".join(self.buf)
                self.buf.clear()
                return data
            if self.complete:
                return None
            if self.closed:
                raise ConnectionError("closed mid-response")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None


class PlainPool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_PlainConn] = []
        self.head = (f"POST {PATH} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(BODY)}\r\n\r\n").encode()

    async def fetch(self) -> int:
        conn = None
        while self.idle and conn is None:
            c = self.idle.pop()
            conn = c if not c.closed else None
        if conn is None:
            _, conn = await asyncio.get_running_loop().create_connection(_PlainConn, self.host, self.port)
        conn.complete = False
        assert conn.transport is not None
        conn.transport.write(self.head + BODY)
        n = 0
        while (chunk := await conn.next_chunk()) is not None:
            n += len(chunk)
        if conn.keep_alive and not conn.closed:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        return n


async def _make(kind: str, url: str) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    host, port = url.removeprefix("http://").split(":")
    headers = {"content-type": "application/json"}
    if kind == "httpx":
        import httpx

        hc = httpx.AsyncClient(base_url=url, timeout=30.0,
                               limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000))

        async def fetch_httpx() -> int:
            n = 0
            async with hc.stream("POST", PATH, content=BODY, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    n += len(chunk)
            return n

        return fetch_httpx, hc.aclose
    if kind == "httpx2":  # pydantic's fork, with the connection-pool fixes (pydantic/httpx2#974, #1075)
        import httpx2

        hc2 = httpx2.AsyncClient(base_url=url, timeout=30.0,
                                 limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=1000))

        async def fetch_httpx2() -> int:
            n = 0
            async with hc2.stream("POST", PATH, content=BODY, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    n += len(chunk)
            return n

        return fetch_httpx2, hc2.aclose
    if kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=64),
                                        timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False)

        async def fetch_aiohttp() -> int:
            n = 0
            async with session.post(PATH, data=BODY, headers=headers) as r:
                async for chunk in r.content.iter_any():
                    n += len(chunk)
            return n

        return fetch_aiohttp, session.close
    if kind == "plain":
        pool = PlainPool(host, int(port))

        async def close_plain() -> None:
            for c in pool.idle:
                if c.transport is not None:
                    c.transport.close()

        return pool.fetch, close_plain
    if kind == "tokengate":
        from app.upstream import Origin, UpstreamPool

        up, origin = UpstreamPool(), Origin.parse(url)
        hdrs = list(headers.items())

        async def fetch_tokengate() -> int:
            resp = await up.request(origin, "POST", PATH, BODY, headers=hdrs, timeout=30.0)
            n = 0
            while (chunk := await resp.next_chunk(30.0)) is not None:
                n += len(chunk)
            resp.release()
            return n

        async def close_tokengate() -> None:
            pass

        return fetch_tokengate, close_tokengate
    raise ValueError(kind)


async def _child(kind: str, url: str, seconds: float, concurrency: int, warmup: float) -> dict[str, Any]:
    fetch, close = await _make(kind, url)
    count = [0]
    sizes: set[int] = set()
    deadline = [time.perf_counter() + warmup]

    async def loop() -> None:
        while time.perf_counter() < deadline[0]:
            sizes.add(await fetch())
            count[0] += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))  # warm-up: connections, caches
    count[0] = 0
    c0, t0 = time.process_time(), time.perf_counter()
    deadline[0] = t0 + seconds
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cpu, elapsed = time.process_time() - c0, time.perf_counter() - t0
    await close()
    n = count[0]
    return {"client": kind, "requests": n, "elapsed_s": round(elapsed, 3), "rps": round(n / elapsed, 1),
            "cpu_us_per_req": round(cpu / n * 1e6, 1) if n else None, "cpu_util": round(cpu / elapsed, 3),
            "body_bytes": sorted(sizes)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Upstream client micro-benchmark (see module docstring).")
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--worker-cpu", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--url", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    raise_nofile()
    import uvloop

    if a.child:
        print(json.dumps(uvloop.run(_child(a.child, a.url, a.seconds, a.concurrency, a.warmup))), flush=True)
        return
    from bench.overhead import RESULTS

    kinds = [k.strip() for k in a.clients.split(",") if k.strip()]
    (RESULTS / "raw").mkdir(parents=True, exist_ok=True)
    log = RESULTS / "raw" / f"upstream-clients-worker-{time.strftime('%Y%m%d-%H%M%S')}.log"
    port = free_port()
    worker = spawn([sys.executable, "-m", "bench.fakeworker", "--port", str(port), "--tokens", "16"], a.worker_cpu, log)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    try:
        wait_http(port, "/health", worker, log, 10)
        url = f"http://127.0.0.1:{port}"
        for r in range(a.rounds):
            for kind in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
                cmd = ["taskset", "-c", str(a.client_cpu), sys.executable, "-m", "bench.upstream_clients",
                       "--child", kind, "--url", url, "--seconds", str(a.seconds), "--warmup", str(a.warmup),
                       "--concurrency", str(a.concurrency)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.seconds * 4 + 60)
                if proc.returncode != 0:
                    print(f"{kind}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[kind].append(res)
                print(f"round {r + 1} {kind:9s} {res['rps']:9.1f} req/s  {res['cpu_us_per_req']:8.1f} us/req  "
                      f"cpu {res['cpu_util']:.2f}  bytes {res['body_bytes']}", file=sys.stderr, flush=True)
    finally:
        stop(worker)
    rows = ["| client | req/s (median) | client CPU us/req (median) | vs httpx req/s |", "|---|---|---|---|"]
    base = statistics.median(x["rps"] for x in runs["httpx"]) if runs.get("httpx") else None
    summary = {}
    for kind, rs in runs.items():
        if not rs:
            continue
        rps, us = statistics.median(x["rps"] for x in rs), statistics.median(x["cpu_us_per_req"] for x in rs)
        summary[kind] = {"rps": rps, "cpu_us_per_req": us, "rounds": rs}
        ratio = f"{rps / base:.2f}x" if base else "-"
        rows.append(f"| {kind} | {rps:.0f} | {us:.0f} | {ratio} |")
    print("\n".join(rows))
    out = RESULTS / f"upstream-clients-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"concurrency": a.concurrency, "seconds": a.seconds, "rounds": a.rounds, "tokens": 16,
            "client_cpu": a.client_cpu, "worker_cpu": a.worker_cpu}
    out.write_text(json.dumps({"meta": meta, "results": summary}, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
