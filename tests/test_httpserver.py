"""The HTTP server against clients that misbehave on purpose (slowloris, huge or many headers, spoofed
forwarding headers), and what the gateway sends on to workers — over real sockets to a real uvicorn."""

from __future__ import annotations

import gc
import logging
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway, scrape

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
BODY = orjson.dumps(CHAT)


@pytest.fixture(scope="module")
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker(record=True) as w:
        yield w


@pytest.fixture(scope="module")
def gw(worker: ThreadedFakeWorker) -> Iterator[Any]:
    settings = Settings(upstream=[worker.url], discovery_interval=60.0, header_timeout=1.0, body_timeout=1.0,
                        max_header_bytes=8192, max_headers=40, max_body_bytes=2 * 1024 * 1024)
    with run_gateway(settings, ready_timeout=20) as gw:
        yield gw


def connect(gw: Any) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


def head(path: str = "/v1/chat/completions", extra: str = "", length: int = len(BODY)) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {length}\r\n{extra}\r\n").encode()


def error_of(response: bytes) -> tuple[int, dict[str, Any]]:
    status = int(response.split(b" ", 2)[1])
    err: dict[str, Any] = orjson.loads(response.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return status, err


def ok(gw: Any) -> bool:
    return httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models", "/metrics", "/status"])
def test_head_is_get_without_the_body(gw: Any, path: str) -> None:
    got = httpx.get(gw.url + path)
    with connect(gw) as sock:
        # HEAD then GET on one connection: the HEAD answer has GET's status and length, and no body bytes between
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n"
                     "connection: close\r\n\r\n".encode())
        first, _, rest = read_all(sock).partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 %d " % got.status_code), first
    assert b"content-length: " in first.lower()
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b'{"status":"ok"}'), rest[:200]
    assert httpx.head(gw.url + "/v1/chat/completions").status_code == 405  # generation routes: POST only
    r = httpx.put(gw.url + path)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"  # what it does answer


def test_headers_trickled_byte_by_byte_get_408_and_others_are_served(gw: Any) -> None:
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    t0 = time.monotonic()
    served = []
    closed_at = None
    for i in range(40):  # a header byte every 0.1 s: never finishes
        try:
            sock.sendall(b"x-slow: %d\r\n" % i if i % 5 == 0 else b"")
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            closed_at = time.monotonic() - t0
            break
        if i % 4 == 0:
            served.append(ok(gw))
        time.sleep(0.1)
    response = read_all(sock, 2)
    sock.close()
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert error_of(response)[1]["code"] == "request_timeout"
    assert closed_at is None or closed_at < 3
    assert served and all(served)


def test_an_idle_connection_is_closed_after_the_header_timeout(gw: Any) -> None:
    sock = connect(gw)
    t0 = time.monotonic()
    data = read_all(sock, 5)
    sock.close()
    assert data == b""  # closed without a word: nothing was asked
    assert 0.8 < time.monotonic() - t0 < 3


def test_a_body_trickled_past_its_deadline_is_408(gw: Any, worker: ThreadedFakeWorker) -> None:
    before = worker.stats.requests
    sock = connect(gw)
    sock.sendall(head() + BODY[:10])
    t0 = time.monotonic()
    response = read_all(sock, 5)
    sock.close()
    status, err = error_of(response)
    assert status == 408 and err["code"] == "request_timeout"
    assert 0.8 < time.monotonic() - t0 < 3
    assert worker.stats.requests == before


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_body_that_never_starts_is_408_too(gw: Any, path: str) -> None:
    sock = connect(gw)
    sock.sendall(head(path, length=500))  # and then not one byte of the body
    t0 = time.monotonic()
    response = read_all(sock, 6)
    sock.close()
    assert response.startswith(b"HTTP/1.1 408"), response[:200]  # it had hung for good
    assert error_of(response)[1]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 4  # body_timeout is 1 s here
    assert ok(gw)


@pytest.mark.parametrize("extra", [
    "x-big: " + "a" * 20_000 + "\r\n",
    "".join(f"x-h{i}: v\r\n" for i in range(60)),
])
def test_huge_or_too_many_headers_are_431(gw: Any, extra: str) -> None:
    sock = connect(gw)
    sock.sendall(head(extra=extra) + BODY)
    response = read_all(sock)
    sock.close()
    status, err = error_of(response)
    assert status == 431 and err["code"] == "request_header_fields_too_large"
    assert ok(gw)


def test_a_huge_header_trickled_in_pieces_is_refused_before_it_ends(gw: Any) -> None:
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
    refused_after = None
    for i in range(100):  # 100 x 1 KiB, never ending the value
        try:
            sock.sendall(b"b" * 1024)
        except (BrokenPipeError, ConnectionResetError):
            refused_after = i
            break
        time.sleep(0.005)
    response = read_all(sock, 3)
    sock.close()
    assert response.startswith(b"HTTP/1.1 431")
    assert refused_after is None or refused_after < 60


def test_large_bodies_and_many_ordinary_headers_are_fine(gw: Any) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "word " * 200_000}]}  # 1 MB in one write, under 2 MiB
    headers = {f"x-app-{i}": "v" for i in range(30)}
    r = httpx.post(gw.base + "/chat/completions", json=big, headers=headers, timeout=30)
    assert r.status_code in (200, 400), r.text  # served, or refused by the context cap: not by the server
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_keep_alive_requests_each_get_their_own_header_deadline(gw: Any) -> None:
    sock = connect(gw)
    sock.sendall(head() + BODY)
    first = b""
    while b"data: [DONE]" not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # the next one stalls
    response = read_all(sock, 5)
    sock.close()
    assert response.startswith(b"HTTP/1.1 408") or response == b""


def test_pipelined_generation_requests_are_answered_in_order(gw: Any) -> None:
    """Three requests in one write: the first starts at once (eagerly, in the read that parsed it), the others wait
    their turn behind it (uvicorn's pipeline), and all three come back complete, in order, on one connection."""
    unary = orjson.dumps({**CHAT, "stream": False, "max_tokens": 2})
    bad = b'{"model": "tiny", "messages": 5}'
    sock = connect(gw)
    sock.sendall(head() + BODY + head(length=len(unary)) + unary + head(length=len(bad)) + bad)
    sock.settimeout(10)
    data = b""
    while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    sock.close()
    parts = data.split(b"HTTP/1.1 ")[1:]
    assert parts[0].startswith(b"200") and b"data: [DONE]" in parts[0] and b"0\r\n\r\n" in parts[0]
    assert parts[1].startswith(b"200") and orjson.loads(parts[1].split(b"\r\n\r\n", 1)[1])["object"] == \
        "chat.completion"
    status, err = error_of(b"HTTP/1.1 " + parts[2])  # OpenAI-shaped
    assert status == 400 and err["param"] == "messages"


def test_pipelined_streams_whose_client_leaves_end_quietly(gw: Any, worker: ThreadedFakeWorker,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    body = orjson.dumps({**CHAT, "max_tokens": 50})
    caplog.set_level(logging.INFO)
    worker.options.token_delay = 0.02
    try:
        _pipeline_and_leave(gw, body)
    finally:
        worker.options.token_delay = 0.0
    assert ok(gw)
    samples = scrape(gw.url + "/metrics")
    assert sum(v for (name, _), v in samples.items() if name == "tokengate_requests_in_flight") == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert messages == []  # "ASGI callable returned without completing response", a write to a closed transport


def _pipeline_and_leave(gw: Any, body: bytes) -> None:
    for _ in range(3):
        sock = connect(gw)
        sock.sendall(head(length=len(body)) + body + head(length=len(body)) + body)
        data = b""
        while b"data:" not in data:
            data += sock.recv(4096)
        time.sleep(0.1)
        sock.close()  # while the first streams, the second waiting behind it
        time.sleep(0.5)


@pytest.mark.parametrize("raw", [
    head(extra=f"content-length: {len(BODY)}\r\n") + BODY,  # two Content-Lengths
    head(extra="transfer-encoding: chunked\r\n") + BODY,
    head(extra="x-request-id: a\x01b\r\n") + BODY,
    b"BREW /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\r\n",
    head(length=-1) + BODY,
], ids=["two-lengths", "length-and-chunked", "control-byte", "unknown-method", "negative-length"])
def test_what_the_http_parser_refuses_is_an_openai_shaped_400(gw: Any, raw: bytes) -> None:
    sock = connect(gw)
    sock.sendall(raw)
    response = read_all(sock, 5)
    sock.close()
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert error_of(response)[1]["code"] == "invalid_request"  # uvicorn's own: "Invalid HTTP request received."
    assert ok(gw)


def test_a_trailing_slash_is_a_404_not_a_redirect(gw: Any) -> None:
    r = httpx.post(gw.base + "/chat/completions/", json=CHAT, timeout=5)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_hop_by_hop_and_client_headers_are_not_forwarded(gw: Any, worker: ThreadedFakeWorker) -> None:
    sock = connect(gw)
    extra = ("connection: keep-alive, x-private\r\nkeep-alive: timeout=5\r\nte: trailers\r\nx-private: 1\r\n"
             "proxy-authorization: Basic eA==\r\nx-forwarded-for: 6.6.6.6\r\nforwarded: for=6.6.6.6\r\n"
             "x-real-ip: 6.6.6.6\r\ncookie: s=1\r\nauthorization: Bearer client-key\r\n"
             "x-request-id: abc-123\r\n")
    sock.sendall(head(extra=extra) + BODY)
    response = b""
    while b"data: [DONE]" not in response:
        response += sock.recv(65536)
    sock.close()
    sent = worker.received[-1]
    assert sent.path == "/v1/chat/completions"
    forwarded = {k.lower() for k in sent.headers}
    assert forwarded <= {"host", "content-type", "content-length", "x-request-id", "authorization",
                         "transfer-encoding", "user-agent", "accept"}, forwarded
    assert "authorization" not in forwarded  # no internal key configured here, and never the client's
    # the client's id, made this request's own (a reused id must not make two requests one for vLLM)
    assert re.fullmatch(r"abc-123-[0-9a-f]{8}", sent.headers.get("x-request-id", ""))
    assert b"\r\nx-request-id: abc-123\r\n" in response  # the client gets its own back


def test_forwarded_headers_are_not_trusted_unless_configured(worker: ThreadedFakeWorker) -> None:
    spoof = {"x-forwarded-for": "203.0.113.9"}
    # admin endpoints answer loopback clients only: a spoofed address must not change who the client is
    with run_gateway(Settings(upstream=[worker.url], discovery_interval=60.0), ready_timeout=20) as gw:
        r = httpx.get(gw.url + "/admin/workers/nope/log", headers=spoof)
        assert r.status_code == 404  # allowed (loopback), then: no such worker
    trusted = Settings(upstream=[worker.url], discovery_interval=60.0, forwarded_allow_ips=["127.0.0.1"])
    with run_gateway(trusted, ready_timeout=20) as gw:
        r = httpx.get(gw.url + "/admin/workers/nope/log", headers=spoof)
        assert r.status_code == 403  # the trusted proxy says the client is remote
        assert httpx.get(gw.url + "/admin/workers/nope/log").status_code == 404


def test_metric_labels_never_come_from_user_input(gw: Any) -> None:
    def series() -> int:
        return sum(1 for (name, _) in scrape(gw.url + "/metrics") if name.startswith("tokengate_"))

    before = series()
    threads = []
    for _ in range(4):
        def spam() -> None:
            with httpx.Client(timeout=5) as c:
                for _ in range(50):
                    junk = uuid.uuid4().hex
                    c.post(gw.base + "/chat/completions", json={**CHAT, "model": junk},
                           headers={"x-tokengate-region": junk[:8]})
                    c.post(gw.base + "/chat/completions", json={**CHAT, "model": junk})
        threads.append(threading.Thread(target=spam))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = series()
    assert after - before < 20, f"{after - before} new series from 400 requests with random model/region names"


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(gw: Any, worker: ThreadedFakeWorker) -> None:
    before = worker.stats.requests
    sock = connect(gw)
    sock.sendall(head(length=3 * 1024 * 1024))  # the headers only: the answer must not wait for the body
    response = read_all(sock, 5)
    sock.close()
    status, err = error_of(response)
    assert status == 413 and err["code"] == "request_too_large"
    assert worker.stats.requests == before


def test_a_chunked_body_over_the_limit_is_413_while_it_is_still_arriving(gw: Any) -> None:
    sock = connect(gw)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"transfer-encoding: chunked\r\n\r\n")
    piece = b"x" * (256 * 1024)
    sent = 0
    answered = False
    while sent < 32 * 1024 * 1024:  # never terminated: only the limit can end this
        if select.select([sock], [], [], 0.002)[0]:  # the answer is there: stop before a reset could drop it
            answered = True
            break
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):  # refused and closed while we were still sending
            answered = True
            break
        sent += len(piece)
        if select.select([sock], [], [], 0)[0]:
            answered = True
            break
    response = read_all(sock, 5)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    # answered while the body was still coming: not after it ended (it never does). What the client got to send
    # before it noticed includes what the kernel buffers on the way (a few MiB on loopback), never all 32 MiB
    assert answered and sent < 16 * 1024 * 1024


def test_finished_requests_leave_no_reference_cycles(gw: Any) -> None:
    """A finished request's objects (its ClientLink, the Exchange watching it, the scope) are freed by refcounting
    as soon as it ends: left in reference cycles they wait for the cyclic GC, whose passes cost a busy gateway
    ~10 % of its CPU and stall the loop."""
    from app.exchange import Exchange
    from app.httpserver import ClientLink

    def alive() -> list[object]:
        return [o for o in gc.get_objects() if isinstance(o, (Exchange, ClientLink))]

    with httpx.Client() as client:
        client.post(gw.url + "/v1/chat/completions", content=BODY).read()  # warm: a connection in the pool
        gc.collect()
        gc.disable()
        try:
            for body in (CHAT, {**CHAT, "stream": False}, {**CHAT, "max_tokens": 0}):  # stream, JSON, 400
                r = client.post(gw.url + "/v1/chat/completions", json=body)
                assert r.status_code in (200, 400)
                assert r.content
            deadline = time.monotonic() + 5
            while alive() and time.monotonic() < deadline:  # the handler's bookkeeping after its last write
                time.sleep(0.05)
            left = alive()
        finally:
            gc.enable()
    assert left == [], left


class _Transport:
    """What uvicorn's protocol needs of a transport, for feeding it by hand."""

    def __init__(self) -> None:
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _fed_by_hand(reads: list[bytes], eager_per_pass: int = 4, header_timeout: float = 10.0,
                 responses: int = 1) -> tuple[list[list[str]], bytes]:
    """Feed a gateway protocol these reads, each from a plain loop callback as the transport would; the app notes
    how far it got. Returns what the app had noted when each data_received returned (and at the end), and what was
    written."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from app.eager import PassBudget
    from app.httpserver import HardenedHttpToolsProtocol

    log: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        log.append("handler started")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        log.append(f"body read ({len(body)} bytes)")
        await asyncio.sleep(0.01)  # the upstream wait
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main() -> tuple[list[list[str]], bytes]:
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(app, lifespan="off", log_level="warning")
        config.load()
        protocol = type("Protocol", (HardenedHttpToolsProtocol,), {"eager_budget": PassBudget(eager_per_pass),
                                                                   "header_timeout": header_timeout})
        proto = protocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        transport = _Transport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        seen: list[list[str]] = []
        for data in reads:
            done = loop.create_future()

            def feed(data: bytes = data, done: asyncio.Future[None] = done) -> None:
                proto.data_received(data)
                seen.append(list(log))
                done.set_result(None)

            loop.call_soon(feed)
            await done
            await asyncio.sleep(0.001)
        for _ in range(200):
            if transport.written.count(b"ok") >= responses or transport.closing:
                break
            await asyncio.sleep(0.005)
        proto.connection_lost(None)
        seen.append(list(log))  # and at the end
        return seen, transport.written

    return asyncio.run(main())


def test_a_generation_request_whose_body_came_with_it_starts_in_the_read_that_parsed_it() -> None:
    seen, written = _fed_by_hand([head() + BODY])
    assert seen[0] == ["handler started", f"body read ({len(BODY)} bytes)"]  # up to its first real wait, already
    assert written.startswith(b"HTTP/1.1 200") and written.endswith(b"ok")


def test_other_requests_and_a_body_still_to_come_start_as_a_task() -> None:
    seen, written = _fed_by_hand([b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])
    assert seen == [[], ["handler started", "body read (0 bytes)"]]  # off the generation path: as uvicorn does
    assert written.endswith(b"ok")
    seen, written = _fed_by_hand([head(), BODY])
    assert seen[0] == []  # the body has not come: a task, so that the body's deadline applies
    assert seen[2] == ["handler started", f"body read ({len(BODY)} bytes)"]


def test_a_pipelined_request_is_not_cut_off_by_the_header_deadline_while_it_runs() -> None:
    # the second request starts when the first is answered; its 10 ms of work outlast a 2 ms header deadline, which
    # must not be armed while it runs (it was: the connection closed under it)
    seen, written = _fed_by_hand([head() + BODY + head() + BODY], header_timeout=0.002, responses=2)
    assert written.count(b"HTTP/1.1 200") == 2 and written.endswith(b"ok"), written
    assert seen[-1].count("handler started") == 2


def test_past_the_loop_pass_budget_a_generation_request_starts_as_a_task() -> None:
    seen, written = _fed_by_hand([head() + BODY], eager_per_pass=0)
    assert seen == [[], ["handler started", f"body read ({len(BODY)} bytes)"]]
    assert written.endswith(b"ok")
    assert written.endswith(b"ok")
