"""Health checks against a worker that is slow, then gone: late answers from a busy worker do not take it out of
rotation at once; a refused connection does."""

from __future__ import annotations

import asyncio
import time

import orjson
from prometheus_client import CollectorRegistry

from app.metrics import GatewayMetrics
from app.tokenizer import TokenizerStore
from app.upstream import UpstreamPool
from app.workers.health import SLOW_CHECKS_TO_FAIL, HealthChecker
from app.workers.registry import Registry, Worker
from bench.fakeworker import FakeWorker


class _SlowHealth:
    """A TCP front that delays /health by ``delay`` seconds, passing everything else to the fake worker."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, first: bool) -> None:
            try:
                while data := await src.read(65536):
                    if first and b"GET /health" in data and self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


async def _scenario() -> list[tuple[bool, str]]:
    async with FakeWorker() as fake:
        front = _SlowHealth(int(fake.url.rsplit(":", 1)[1]))
        server = await asyncio.start_server(front.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        registry = Registry()
        worker = Worker(name="w", url=f"http://127.0.0.1:{port}")
        registry.add(worker)
        pool = UpstreamPool(idle_ttl=0.0)
        checker = HealthChecker(registry, pool, GatewayMetrics(CollectorRegistry()), TokenizerStore(),
                                timeout=0.2)
        seen: list[tuple[bool, str]] = []
        await checker.check(worker)
        seen.append((worker.ready, worker.reason))
        front.delay = 0.5  # busy: every health check answers late
        for _ in range(SLOW_CHECKS_TO_FAIL):
            await checker.check(worker)
            seen.append((worker.ready, worker.reason))
        front.delay = 0.0
        await checker.check(worker)  # back: ready again after its probe
        seen.append((worker.ready, worker.reason))
        server.close()
        await server.wait_closed()
        await checker.check(worker)  # gone: refused at once
        seen.append((worker.ready, worker.reason))
        await pool.close()
        return seen


def test_late_health_answers_need_several_in_a_row_a_refusal_does_not() -> None:
    seen = asyncio.run(_scenario())
    assert seen[0] == (True, "ready")
    slow = seen[1:1 + SLOW_CHECKS_TO_FAIL]
    assert [ready for ready, _ in slow] == [True] * (SLOW_CHECKS_TO_FAIL - 1) + [False]
    assert "unreachable" in slow[-1][1]
    assert seen[-2] == (True, "ready")
    assert seen[-1][0] is False and "unreachable" in seen[-1][1]


class _ShapedWorker:
    """A worker whose /v1/models and 1-token generation answer with whatever JSON the test sets."""

    def __init__(self) -> None:
        self.models: object = {"object": "list", "data": [{"id": "tiny", "max_model_len": 2048}]}
        self.probe: object = {"choices": [{"text": "x"}], "usage": {"completion_tokens": 1}}
        self.hang = False  # the 1-token generation never answers

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/v1/completions" and self.hang:
                    await asyncio.sleep(3600)
                doc = self.models if path == b"/v1/models" else self.probe if path == b"/v1/completions" else {}
                body = orjson.dumps(doc)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


BAD_MODELS = [[], {"data": [1]}, {"data": "m"}, {"data": None}, {"data": [{"id": 5}]}, "x"]
BAD_PROBES = [{"usage": 1}, {"usage": "n/a"}, [], {"usage": {"completion_tokens": "1"}}, {"usage": None}, 7]


async def _shapes() -> list[tuple[str, bool, str]]:
    front = _ShapedWorker()
    server = await asyncio.start_server(front.handle, "127.0.0.1", 0)
    registry = Registry()
    worker = Worker(name="w", url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    registry.add(worker)
    pool = UpstreamPool(idle_ttl=0.0)
    checker = HealthChecker(registry, pool, GatewayMetrics(CollectorRegistry()), TokenizerStore(), timeout=2)
    seen: list[tuple[str, bool, str]] = []
    for models in BAD_MODELS:
        front.models = models
        await checker.check(worker)
        seen.append((f"models {models}", worker.ready, worker.reason))
    front.models = {"data": [{"id": "tiny", "max_model_len": 0}, 3]}
    for probe in BAD_PROBES:
        front.probe = probe
        await checker.check(worker)
        seen.append((f"probe {probe}", worker.ready, worker.reason))
    front.probe = {"usage": {"completion_tokens": 1}}
    await checker.check(worker)
    seen.append(("good", worker.ready, str(registry.snapshot.models)))
    await pool.close()
    server.close()
    await server.wait_closed()
    return seen


def test_worker_answers_of_another_shape_leave_it_not_ready_and_the_checks_going() -> None:
    seen = asyncio.run(_shapes())
    for what, ready, reason in seen[:-1]:
        assert not ready, what
        assert reason in ("/v1/models lists no model", "1-token generation produced no token"), (what, reason)
    what, ready, models = seen[-1]
    assert ready
    assert "max_model_len=4096" in models  # a max_model_len of 0 counts as absent, not as "no prompt fits"


async def _one_hangs() -> tuple[list[tuple[bool, bool]], float]:
    hung, fine = _ShapedWorker(), _ShapedWorker()
    hung.hang = True
    servers = [await asyncio.start_server(w.handle, "127.0.0.1", 0) for w in (hung, fine)]
    registry = Registry()
    a, b = (Worker(name=n, url=f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}")
            for n, s in zip("ab", servers, strict=True))
    registry.add(a)
    registry.add(b)
    pool = UpstreamPool(idle_ttl=0.0)
    checker = HealthChecker(registry, pool, GatewayMetrics(CollectorRegistry()), TokenizerStore(), timeout=0.5,
                            probe_timeout=3600)
    seen = []
    t0 = time.monotonic()
    await checker.check_all(wait=0.5)
    seen.append((a.ready, b.ready))
    servers[1].close()  # b goes away
    await servers[1].wait_closed()
    await checker.check_all(wait=0.5)  # a's probe still hangs: its check is skipped, b's runs
    seen.append((a.ready, b.ready))
    took = time.monotonic() - t0
    run = asyncio.create_task(checker.run())
    await asyncio.sleep(0.1)
    run.cancel()  # and the checks under way with it
    await asyncio.gather(run, return_exceptions=True)
    await asyncio.sleep(0)
    assert all(t.done() for t in checker._checks.values())
    await pool.close()
    servers[0].close()
    return seen, took


def test_a_probe_that_hangs_holds_back_only_its_own_worker() -> None:
    seen, took = asyncio.run(_one_hangs())
    assert seen == [(False, True), (False, False)]
    assert took < 3  # not the hung probe's timeout
