"""The request path against fake workers on loopback: what a real engine can't do on demand (die mid-stream,
stall, answer garbage, split events across reads), plus routing and aborts measured precisely."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httptools
import httpx
import orjson
import pytest

from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import metric_sum, open_request, run_gateway, scrape, wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
COMPLETION = {"model": "tiny", "prompt": "hello there", "max_tokens": 8}


def events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


@pytest.fixture
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker(record=True) as w:
        yield w


def gateway(*workers: ThreadedFakeWorker, **overrides: Any) -> Any:
    """A gateway in front of these workers; set fault options *after* it is ready (the readiness probe is a real
    generation, and a faulty worker never becomes ready)."""
    settings = {"discovery_interval": 60.0, **overrides}
    return run_gateway(Settings(upstream=[w.url for w in workers], **settings), ready_timeout=20)


def test_streams_by_default_and_strips_the_usage_it_asked_for(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = events(r.text)
        assert evs[-1] == "[DONE]" and len(evs) == 1 + 8 + 1  # role, 8 tokens, [DONE]: no usage chunk
        sent = worker.received[-1].json()  # type: ignore[index]
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert metric_sum(scrape(gw.url + "/metrics"), "tokengate_completion_tokens_total") == 8


def test_invalid_requests_for_a_served_model_are_counted_as_its_own(worker: ThreadedFakeWorker) -> None:
    """The model label comes from a bounded set (the models served): a served model's invalid requests carry its
    name, anything else stays 'unknown'."""
    with gateway(worker) as gw:
        for body in ({**CHAT, "max_tokens": 0}, {**CHAT, "n": "2"}, {**CHAT, "model": "made-up", "max_tokens": 0},
                     {**CHAT, "model": 7}):
            assert httpx.post(gw.base + "/chat/completions", json=body, timeout=10).status_code == 400
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_requests_total", status="400", model=CHAT["model"]) == 2
        assert metric_sum(samples, "tokengate_requests_total", status="400", model="unknown") == 2
        assert metric_sum(samples, "tokengate_requests_total", model="made-up") == 0


def test_a_reused_request_id_still_names_one_request_on_the_worker(worker: ThreadedFakeWorker) -> None:
    """Two requests with one X-Request-Id (a retry, or another client's) are two requests to vLLM, and an abort
    of one can't reach the other; each client gets its own id back."""
    with gateway(worker) as gw:
        for _ in range(2):
            r = httpx.post(gw.base + "/chat/completions", json=CHAT, headers={"x-request-id": "trace-7"}, timeout=10)
            assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7"
        sent = [q.headers["x-request-id"] for q in worker.received or () if q.path == "/v1/chat/completions"]
        assert len(sent) == 2 and len(set(sent)) == 2 and all(i.startswith("trace-7-") for i in sent)


def test_usage_kept_when_the_client_asks(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        body = {**CHAT, "stream_options": {"include_usage": True}}
        evs = events(httpx.post(gw.base + "/chat/completions", json=body, timeout=10).text)
        usage = orjson.loads(evs[-2])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_non_stream_is_one_object_built_from_a_worker_stream(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        doc = r.json()
        assert r.headers["content-type"] == "application/json"
        assert doc["object"] == "chat.completion" and doc["usage"]["completion_tokens"] == 8
        assert doc["choices"][0]["message"]["role"] == "assistant" and doc["choices"][0]["finish_reason"] == "length"
        assert worker.received[-1].json()["stream"] is True  # type: ignore[index]


def test_non_stream_unary_passes_the_workers_own_answer_through(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, non_stream_upstream="unary") as gw:
        r = httpx.post(gw.base + "/chat/completions",
                       json={**CHAT, "stream": False}, timeout=10)
        doc = r.json()
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert doc["object"] == "chat.completion" and doc["usage"]["completion_tokens"] == 8
        sent = worker.received[-1].json()  # type: ignore[index]
        assert sent["stream"] is False and "stream_options" not in sent  # vLLM refuses stream_options unstreamed
        refused = httpx.post(gw.base + "/chat/completions", timeout=10,
                             json={**CHAT, "stream": False, "stream_options": {"include_usage": True}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream_options"
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_completion_tokens_total") == 8
        assert metric_sum(samples, "tokengate_requests_total", status="200") == 1
        # streaming requests are not affected
        evs = events(httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).text)
        assert evs[-1] == "[DONE]" and worker.received[-1].json()["stream"] is True  # type: ignore[index]


def test_non_stream_unary_client_disconnect_aborts_the_worker_request(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, non_stream_upstream="unary") as gw:
        worker.options.token_delay = 0.02
        sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 500, "stream": False})
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        sent = worker.received[-1]  # type: ignore[index]
        assert sent.json()["stream"] is False
        sock.close()
        assert worker.wait_for(lambda s: s.aborted == 1, 1.0), "the worker request outlived the client by 1 s"
        # and the worker is told outright, although no response head had come back (it comes with the answer)
        rid = sent.headers["x-request-id"]
        wait_until(lambda: any(r.path == "/inference/v1/abort_requests" and rid in r.body.decode()
                               for r in list(worker.received or ())), 2, "the explicit abort")


def test_non_stream_unary_timeout_is_504_and_does_not_take_the_worker_out(worker: ThreadedFakeWorker) -> None:
    """Unstreamed, the read timeout bounds the whole generation: running into it is a long answer, not a failing
    worker (three failures in a row would take it out of rotation)."""
    with gateway(worker, non_stream_upstream="unary", read_timeout=0.3) as gw:
        worker.options.token_delay = 0.05  # 8 tokens: ~0.4 s
        for _ in range(4):
            r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
            assert r.status_code == 504 and r.json()["error"]["code"] == "worker_timeout"
        # the worker may still be generating them: told to stop (the fake answers 404: asked once, then no more)
        rids = {r.headers["x-request-id"] for r in list(worker.received or ()) if r.path == "/v1/chat/completions"}
        wait_until(lambda: any(r.path == "/inference/v1/abort_requests" and
                               set(orjson.loads(r.body)["request_ids"]) & rids for r in list(worker.received or ())),
                   2, "the explicit abort")
        worker.options.token_delay = 0.0
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_worker_dying_mid_stream_is_one_in_band_error_and_no_fake_finish(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        worker.options.fail_after_chunks = 4
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 200
        evs = events(r.text)
        assert "[DONE]" not in evs
        err = orjson.loads(evs[-1])["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "worker_disconnected"
        assert all(orjson.loads(e).get("choices", [{}])[0].get("finish_reason") is None for e in evs[:-1])
        assert len(evs) == 4 + 1
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_upstream_errors_total", kind="closed") == 1


def test_a_worker_error_event_ends_the_stream_as_failed_even_with_done_after_it(worker: ThreadedFakeWorker) -> None:
    """vLLM ends a stream whose generation failed with its error event and then ``[DONE]``: the client must not
    get the ``[DONE]`` (a failed stream that looks finished), and the request counts as failed."""
    with gateway(worker) as gw:
        worker.options.error_after_chunks = 3
        for route, body in (("/chat/completions", CHAT), ("/completions", COMPLETION)):
            r = httpx.post(gw.base + route, json=body, timeout=10)
            assert r.status_code == 200
            evs = events(r.text)
            assert "[DONE]" not in evs, evs
            assert len(evs) == 3 + 1 and orjson.loads(evs[-1])["error"]["message"] == "injected engine failure"
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 500 and r.json()["error"]["message"] == "injected engine failure"
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_requests_total", status="500") == 3
        assert metric_sum(samples, "tokengate_requests_total", status="200") == 0
        assert metric_sum(samples, "tokengate_upstream_errors_total", kind="status_5xx") == 3


def test_worker_going_silent_mid_stream_hits_the_idle_timeout(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, stream_idle_timeout=0.5) as gw:
        worker.options.stall_after_chunks = 3
        t0 = time.monotonic()
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert time.monotonic() - t0 < 3
        err = orjson.loads(events(r.text)[-1])["error"]
        assert err["code"] == "worker_timeout"
        assert worker.wait_for(lambda s: s.aborted == 1, 2)  # and the worker was told (connection closed)


def test_worker_that_never_answers_is_504(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, read_timeout=0.5) as gw:
        worker.options.stall_after_chunks = 0
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 504 and r.json()["error"]["code"] == "worker_timeout"


def test_a_stream_whose_worker_sends_no_first_byte_is_a_504_not_an_empty_stream(worker: ThreadedFakeWorker) -> None:
    """The relay is taken on before the worker's first byte; until that byte nothing has gone to the client, so a
    timeout there is still an error status, with no SSE head sent."""
    with gateway(worker, read_timeout=0.5) as gw:
        worker.options.stall_after_chunks = 0
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 504 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "worker_timeout"
        assert worker.wait_for(lambda s: s.aborted == 1, 2)


def test_malformed_sse_is_an_error_event_and_the_gateway_keeps_serving(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        worker.options.malformed = True
        err = orjson.loads(events(httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).text)[-1])
        assert err["error"]["code"] == "bad_worker_response"
        worker.options.malformed = False
        assert events(httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).text)[-1] == "[DONE]"


def test_worker_errors_before_the_first_byte_pass_through(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        worker.options.status = 400
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 400
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == 400  # the worker's own code, as it sent it (vLLM's are numbers)
        worker.options.status, worker.options.retry_after = 429, 3
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"


def test_unreachable_worker_is_502() -> None:
    w = ThreadedFakeWorker().start()
    with gateway(w) as gw:
        w.stop()
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 502 and r.json()["error"]["code"] == "worker_unreachable"


def test_refused_before_the_first_byte_is_retried_on_another_worker() -> None:
    with ThreadedFakeWorker(record=True) as a, ThreadedFakeWorker(record=True) as b:
        with gateway(a, b) as gw:
            a.options.fail_after_chunks = 0  # headers, then the connection drops
            done_before = b.stats.completed
            for _ in range(4):
                r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
                assert events(r.text)[-1] == "[DONE]"
            assert b.wait_for(lambda s: s.completed - done_before == 4, 5) and a.stats.requests >= 1


def test_503_from_a_worker_is_retried_then_passed_through() -> None:
    with ThreadedFakeWorker() as a, ThreadedFakeWorker() as b:
        with gateway(a, b) as gw:
            a.options.status = 503
            done_before = b.stats.completed
            for _ in range(4):
                assert httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).status_code == 200
            assert a.stats.requests >= 1  # a was tried ...
            assert b.wait_for(lambda s: s.completed - done_before == 4, 5)  # ... and b answered every time
            b.options.status = 503
            assert httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).status_code == 503


def test_idle_workers_take_turns() -> None:
    """Ties go round. The gateway's own calls (here: counting each prompt through a worker's /tokenize) take
    turns apart from the requests: they shared one turn, and with two workers every request went to the same one."""
    with ThreadedFakeWorker() as a, ThreadedFakeWorker() as b:
        with gateway(a, b) as gw:
            before = (a.stats.completed, b.stats.completed)
            for _ in range(10):
                r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
                assert r.status_code == 200, r.text
            wait_until(lambda: a.stats.completed + b.stats.completed - sum(before) == 10, 5, "ten answers")
            got = (a.stats.completed - before[0], b.stats.completed - before[1])
            assert sorted(got) == [5, 5], got


def test_fewest_requests_in_flight_wins() -> None:
    with ThreadedFakeWorker(token_delay=0.05) as a, ThreadedFakeWorker(token_delay=0.05) as b:
        with gateway(a, b) as gw:
            socks = [open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 60}) for _ in range(6)]
            assert a.wait_for(lambda s: s.in_flight == 3, 5) and b.wait_for(lambda s: s.in_flight == 3, 5)
            for s in socks[:3]:
                s.close()
            wait_until(lambda: a.stats.in_flight + b.stats.in_flight == 3, 5, "three streams to end")
            assert {a.stats.in_flight, b.stats.in_flight} == {1, 2}  # streams alternated between the two
            idle = a if a.stats.in_flight == 1 else b
            before = idle.stats.requests
            extra = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 60})
            assert idle.wait_for(lambda s: s.requests == before + 1, 5)  # it went to the less loaded one
            for s in [*socks[3:], extra]:
                s.close()


def _wait_for_first_bytes(sock: socket.socket) -> None:
    data = b""
    while b"data: {" not in data:
        data += sock.recv(65536)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_worker_request_within_a_second(worker: ThreadedFakeWorker,
                                                                      stream: bool) -> None:
    with gateway(worker) as gw:
        worker.options.token_delay = 0.02
        sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 500, "stream": stream})
        if stream:
            _wait_for_first_bytes(sock)
        else:
            assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        gone = time.monotonic()
        sock.close()
        assert worker.wait_for(lambda s: s.aborted == 1, 1.0), "the worker request outlived the client by 1 s"
        assert time.monotonic() - gone < 1.0
        phase = "streaming" if stream else "non_stream"
        wait_until(lambda: metric_sum(scrape(gw.url + "/metrics"), "tokengate_client_disconnects_total",
                                      phase=phase, region="local", preset="external") == 1, 5, "the disconnect metric")


def test_under_a_plain_asgi_server_the_relay_works_through_send(worker: ThreadedFakeWorker) -> None:
    # uvicorn's stock protocol offers no direct writes (no ClientLink): streams, JSON answers and disconnects go
    # through the ASGI send/receive path (what another ASGI server would get)
    with run_gateway(Settings(upstream=[worker.url], discovery_interval=60.0), ready_timeout=20,
                     http="httptools") as gw:
        evs = events(httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).text)
        assert evs[-1] == "[DONE]" and len(evs) == 1 + 8 + 1
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert r.headers["content-length"] == str(len(r.content))
        worker.options.token_delay = 0.02
        sock = open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 500})
        _wait_for_first_bytes(sock)
        sock.close()
        assert worker.wait_for(lambda s: s.aborted == 1, 1.0), "the worker request outlived the client by 1 s"


def test_client_disconnect_before_the_first_token_aborts_too(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        worker.options.ttft = 5.0  # a long prefill
        sock = open_request(gw.url, "/v1/chat/completions", CHAT)
        assert worker.wait_for(lambda s: s.in_flight == 1, 5)
        sock.close()
        assert worker.wait_for(lambda s: s.aborted == 1, 1.0)


class _TrickleWorker:
    """A worker that writes its SSE body a few bytes at a time: events split across reads at every offset."""

    def __init__(self, piece: int, chunks: list[dict[str, Any]] | None = None) -> None:
        self.piece = piece
        self.chunks = _stream_chunks() if chunks is None else chunks
        self.tokenize = b'{"count":5}'
        self.chat_status = 200  # anything else: that status line, with an OpenAI-shaped error body
        self.chat_type: bytes | None = None  # a 200 of this content type whose body is "{}" (not an event stream)
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            body = await reader.readexactly(length) if length else b""
            path = head.split(b" ")[1]
            if path == b"/v1/models":
                payload = orjson.dumps({"object": "list", "data": [{"id": "tiny", "max_model_len": 2048}]})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
            elif path == b"/v1/completions":  # the readiness probe
                payload = orjson.dumps({"id": "c", "choices": [{"text": "x"}], "usage": {"completion_tokens": 1}})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
            elif path == b"/tokenize":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(self.tokenize), self.tokenize))
            elif path == b"/v1/chat/completions" and self.chat_status != 200:
                err = orjson.dumps({"error": {"message": "odd", "type": "x", "param": None, "code": self.chat_status}})
                writer.write(b"HTTP/1.1 %d Odd\r\ncontent-length: %d\r\n\r\n%b" % (self.chat_status, len(err), err))
            elif path == b"/v1/chat/completions" and self.chat_type is not None:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-length: 2\r\n\r\n{}" % self.chat_type)
            elif path == b"/v1/chat/completions":
                assert orjson.loads(body)["stream"] is True
                sse = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n"  # (any depth)
                               for c in self.chunks) + b"data: [DONE]\n\n"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for i in range(0, len(sse), self.piece):
                    part = sse[i:i + self.piece]
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
                    await asyncio.sleep(0)
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    def __enter__(self) -> _TrickleWorker:
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            assert self.server is not None
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def _stream_chunks() -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny"}
    out = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    out += [{**base, "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]}
            for i in range(5)]
    out[-1]["choices"][0]["finish_reason"] = "length"
    out.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})
    return out


@pytest.mark.parametrize("piece", [1, 7, 50])
def test_events_split_across_reads_reach_the_client_whole(piece: int) -> None:
    with _TrickleWorker(piece) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        evs = events(httpx.post(gw.base + "/chat/completions", json=body, timeout=10).text)
        assert evs[-1] == "[DONE]" and len(evs) == 7  # role + 5 tokens + DONE (usage stripped)
        text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in evs[:-1])
        assert text == " w0 w1 w2 w3 w4"
        doc = httpx.post(gw.base + "/chat/completions", json={**body, "stream": False}, timeout=10).json()
        assert doc["choices"][0]["message"]["content"] == " w0 w1 w2 w3 w4"
        assert doc["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("choices", [5, [{"index": "0", "delta": {"content": "x"}}],
                                     [{"index": 0, "delta": {"tool_calls": [{"index": [0]}]}}]], ids=str)
def test_a_worker_stream_of_another_shape_is_a_502_for_a_non_streaming_client(choices: Any) -> None:
    chunks = _stream_chunks()
    chunks[2] = {**chunks[2], "choices": choices}
    with _TrickleWorker(4096, chunks) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": False}
        r = httpx.post(gw.base + "/chat/completions", json=body, timeout=10)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "bad_worker_response"
        body["stream"] = True  # a streaming client gets the events as they came: the gateway reads no index
        assert events(httpx.post(gw.base + "/chat/completions", json=body, timeout=10).text)[-1] == "[DONE]"


@pytest.mark.parametrize("usage", [{"prompt_tokens": "5", "completion_tokens": -3},
                                   {"prompt_tokens": 1e300, "completion_tokens": True}, {"completion_tokens": [5]}],
                         ids=str)
def test_a_worker_usage_of_another_shape_counts_what_was_streamed(usage: dict[str, Any]) -> None:
    chunks = _stream_chunks()
    chunks[-1] = {**chunks[-1], "usage": usage}
    with _TrickleWorker(4096, chunks) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        assert events(httpx.post(gw.base + "/chat/completions", json=body, timeout=10).text)[-1] == "[DONE]"
        doc = httpx.post(gw.base + "/chat/completions", json={**body, "stream": False}, timeout=10).json()
        assert doc["usage"] == usage  # passed on as the worker sent it
        samples = scrape(gw.url + "/metrics")
        # the five content tokens of each answer, and no exception after the answer (a counter can't go down)
        assert metric_sum(samples, "tokengate_completion_tokens_total") == 10
        assert metric_sum(samples, "tokengate_requests_total", status="200") == 2
        assert metric_sum(samples, "tokengate_requests_in_flight") == 0


@pytest.mark.parametrize("status", [999, 301, 201, 600])
def test_a_worker_status_that_is_no_error_status_is_a_502(status: int) -> None:
    with _TrickleWorker(4096) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        w.chat_status = status
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 502, r.text  # not passed on: it would break the client's HTTP (or uvicorn's)
        assert r.json()["error"]["message"] == "odd"
        w.chat_status = 418
        assert httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).status_code == 418  # errors pass


@pytest.mark.parametrize("content_type", [b"text/html; charset=utf-8", b"application/json"])
def test_a_streamed_request_answered_with_no_event_stream_is_a_502_before_anything_is_sent(content_type: bytes
                                                                                            ) -> None:
    with _TrickleWorker(4096) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        w.chat_type = content_type
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 502 and r.headers["content-type"] == "application/json", r.text
        err = r.json()["error"]
        assert err["code"] == "bad_worker_response" and content_type.split(b";")[0].decode() in err["message"]
        assert metric_sum(scrape(gw.url + "/metrics"), "tokengate_upstream_errors_total", kind="protocol") == 1


def test_a_worker_without_tokenize_is_a_502_that_says_what_to_do() -> None:
    """Not a 404 for a model /v1/models lists: the worker is no vLLM, and the prompt can't be counted there."""
    with ThreadedFakeWorker(tokenize=False) as w, run_gateway(Settings(upstream=[w.url])) as gw:
        for route, body in (("/chat/completions", CHAT), ("/completions", COMPLETION)):
            r = httpx.post(gw.base + route, json={**body, "stream": False}, timeout=10)
            assert r.status_code == 502, r.text
            err = r.json()["error"]
            assert err["code"] == "bad_worker_response" and "--tokenizer tiny=PATH" in err["message"]


@pytest.mark.parametrize("count", [b"-100", b"1e3", b"true", b"10" * 200])
def test_a_tokenize_count_that_is_no_count_is_a_502_before_any_generation(count: bytes) -> None:
    with _TrickleWorker(4096) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        w.tokenize = b'{"count":%b}' % count
        r = httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "bad_worker_response"
        assert metric_sum(scrape(gw.url + "/metrics"), "tokengate_prompt_tokens_total") == 0


def test_an_answer_nested_deeper_than_can_be_written_is_a_502() -> None:
    deep: Any = "x"
    for _ in range(300):  # orjson reads 1 024 levels but writes 254
        deep = [deep]
    chunks = _stream_chunks()
    chunks[1] = {**chunks[1], "trace": deep}
    with _TrickleWorker(4096, chunks) as w, run_gateway(Settings(upstream=[f"http://127.0.0.1:{w.port}"])) as gw:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        r = httpx.post(gw.base + "/chat/completions", json={**body, "stream": False}, timeout=10)
        assert r.status_code == 502, r.text
        assert events(httpx.post(gw.base + "/chat/completions", json=body, timeout=10).text)[-1] == "[DONE]"


def test_unknown_model_is_404_and_bounded_labels(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        for i in range(20):
            r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "model": f"nope-{i}"}, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        text = httpx.get(gw.url + "/metrics").text
        assert "nope-" not in text  # a million model names must not make a million series


def test_readyz_and_models(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, context_cap=1000) as gw:
        ready = httpx.get(gw.url + "/readyz").json()
        assert ready["ready"] is True and ready["workers"][0]["models"] == ["tiny"]
        models = httpx.get(gw.base + "/models").json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 1000)]
        assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}


def test_models_show_the_context_cap_of_the_presets_a_request_meets() -> None:
    from app.deployment import preset_caps
    from app.presets import builtin_presets_dir, load_catalog

    caps = preset_caps(load_catalog([builtin_presets_dir()]))  # fr/h100-1x: context cap 32768, fr/h100-2x: 65536
    with ThreadedFakeWorker(max_model_len=100_000) as one, ThreadedFakeWorker(max_model_len=100_000) as two:
        for upstream, region_cap in (([f"fr/h100-2x={two.url}"], 65536),
                                     ([f"fr/h100-1x={one.url}", f"fr/h100-2x={two.url}"], 32768)):
            with run_gateway(Settings(upstream=upstream, region="fr", discovery_interval=60.0), preset_caps=caps,
                             ready_timeout=20) as gw:
                for query in ("", "?region=fr"):
                    models = httpx.get(gw.base + "/models" + query).json()["data"]
                    assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", region_cap)], upstream
                text = "abcd" * (region_cap + 10)  # the fake worker counts 4 bytes a token
                long = {**CHAT, "messages": [{"role": "user", "content": text}], "stream": False}
                r = httpx.post(gw.base + "/chat/completions", json=long, timeout=30)
                assert r.status_code == 400 and f"maximum context length is {region_cap}" in r.text  # what it said


def test_without_region_requests_go_to_the_one_region_the_upstreams_name(worker: ThreadedFakeWorker) -> None:
    with run_gateway(Settings(upstream=[f"fr/h100-1x={worker.url}"], discovery_interval=60.0),
                     ready_timeout=20) as gw:
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
        assert r.status_code == 200, r.text  # it had been a 503: requests went to region "local"
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10,
                       headers={"x-tokengate-region": "uae"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_region"


def test_cap_and_upstream_error_counters_carry_region_and_preset(worker: ThreadedFakeWorker) -> None:
    for policy, metric in (("clamp", "tokengate_cap_clamps_total"), ("reject", "tokengate_cap_rejections_total")):
        with run_gateway(Settings(upstream=[f"fr/h100-1x={worker.url}"], max_tokens_cap=16, cap_policy=policy,
                                  discovery_interval=60.0), ready_timeout=20) as gw:
            httpx.get(gw.base + "/models")  # the same caps, looked up first here: the counters are still made at 0
            r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10)
            samples = scrape(gw.url + "/metrics")
            assert any(n == metric and ("region", "fr") in labels for n, labels in samples), "no series at 0"
            r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "max_tokens": 100, "stream": False},
                           timeout=10)
            assert r.status_code == (200 if policy == "clamp" else 400), r.text
            samples = scrape(gw.url + "/metrics")
            assert metric_sum(samples, metric, model="tiny", region="fr", preset="h100-1x",
                              reason="max_tokens_cap") == 1
            if policy == "clamp":
                worker.options.fail_after_chunks = 2
                try:
                    httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10)
                finally:
                    worker.options.fail_after_chunks = None
                samples = scrape(gw.url + "/metrics")
                assert metric_sum(samples, "tokengate_upstream_errors_total", region="fr", preset="h100-1x",
                                  kind="closed") == 1


def test_a_clamp_is_counted_with_its_request_when_it_ends(worker: ThreadedFakeWorker) -> None:
    """So that clamps / requests over any window stays <= 1 (requests_total counts requests as they end)."""
    with gateway(worker, max_tokens_cap=4) as gw:
        worker.options.token_delay = 0.1
        try:
            with contextlib.closing(open_request(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 100})):
                assert worker.wait_for(lambda s: s.in_flight == 1, 5)
                samples = scrape(gw.url + "/metrics")
                assert metric_sum(samples, "tokengate_cap_clamps_total") == 0
                assert metric_sum(samples, "tokengate_requests_total") == 0
                wait_until(lambda: metric_sum(scrape(gw.url + "/metrics"), "tokengate_requests_total") == 1, 5,
                           "the request's end")
            samples = scrape(gw.url + "/metrics")
            assert metric_sum(samples, "tokengate_cap_clamps_total", reason="max_tokens_cap") == 1
        finally:
            worker.options.token_delay = 0.0


def test_error_series_exist_from_0_and_an_outage_s_503s_carry_the_region_s_preset() -> None:
    worker = ThreadedFakeWorker().__enter__()
    try:
        with run_gateway(Settings(upstream=[f"fr/h100-1x={worker.url}"], discovery_interval=0.2),
                         ready_timeout=20) as gw:
            assert httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}).status_code == 200
            samples = scrape(gw.url + "/metrics")
            # rate() sees the first burst of errors only if their series were there before it (at 0)
            for name in (worker.url.removeprefix("http://"), ""):  # the worker's, and its pool's (an outage)
                for status in ("500", "502", "503", "504"):
                    labels = (("model", "tiny"), ("preset", "h100-1x"), ("region", "fr"), ("route", "chat"),
                              ("status", status), ("worker", name))
                    assert samples.get(("tokengate_requests_total", labels)) == 0, (name, status)
            worker.__exit__(None, None, None)
            wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 503, 10, "the worker out of rotation")
            r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False})
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker_available", r.text
            samples = scrape(gw.url + "/metrics")
            assert metric_sum(samples, "tokengate_requests_total", status="503", region="fr", preset="h100-1x",
                              worker="") == 1
            # a region header is no label before it is known to exist: no series per junk value
            counts = []
            for i in range(5):
                r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False},
                               headers={"x-tokengate-region": f"junk-{i}"})
                assert r.status_code == 503, r.text
                samples = scrape(gw.url + "/metrics")
                assert not [k for k in samples if any(v.startswith("junk") for _, v in k[1])]
                counts.append(len(samples))
            assert len(set(counts)) == 1, counts
    finally:
        worker.__exit__(None, None, None)


def test_the_relay_overhead_is_observed_per_relayed_chunk(worker: ThreadedFakeWorker) -> None:
    with gateway(worker) as gw:
        worker.options.token_delay = 0.01  # each token its own read, so its own relayed chunk
        try:
            for _ in range(3):
                assert events(httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).text)[-1] == "[DONE]"
        finally:
            worker.options.token_delay = 0.0
        samples = scrape(gw.url + "/metrics")
        assert metric_sum(samples, "tokengate_gateway_overhead_seconds_count", phase="dispatch") == 3
        # 8 tokens: role + first token, 7 more, and the end (finish, usage, [DONE]) may come in 8-10 reads
        relayed = metric_sum(samples, "tokengate_gateway_overhead_seconds_count", phase="relay")
        assert 3 * 8 <= relayed <= 3 * 10, relayed


def test_readyz_is_503_and_requests_502_while_the_only_worker_is_unreachable() -> None:
    with run_gateway(Settings(upstream=["http://127.0.0.1:9"]), wait_ready=False) as gw:
        r = httpx.get(gw.url + "/readyz")
        assert r.status_code == 503 and r.json()["not_ready"] == ["127.0.0.1:9"]
        for body in (CHAT, {**CHAT, "model": "anything"}):  # it never said which models it serves: no 404
            r = httpx.post(gw.base + "/chat/completions", json=body, timeout=10)
            assert r.status_code == 502 and r.json()["error"]["code"] == "worker_unreachable", r.text
            assert "127.0.0.1" not in r.text  # no internal address in what a client sees


def test_an_unknown_model_is_404_once_every_worker_has_listed_its_models(worker: ThreadedFakeWorker) -> None:
    with run_gateway(Settings(upstream=[worker.url, "http://127.0.0.1:9"]), wait_ready=False) as gw:
        wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 200, 10, "the live worker ready")
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "model": "nope"}, timeout=10)
        assert r.status_code == 502  # the unreachable one may serve it
    with run_gateway(Settings(upstream=[worker.url])) as gw:
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "model": "nope"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_clamp_header_with_remote_counting(worker: ThreadedFakeWorker) -> None:
    with gateway(worker, max_tokens_cap=16) as gw:
        r = httpx.post(gw.base + "/chat/completions", json={**CHAT, "max_tokens": 100, "stream": False}, timeout=10)
        assert r.headers["x-tokengate-max-tokens-clamped"] == "100"
        assert worker.received[-1].json()["max_tokens"] == 16  # type: ignore[index]


def test_a_compressed_request_body_is_refused_by_name(worker: ThreadedFakeWorker) -> None:
    """It read as invalid JSON ("str is not valid UTF-8: surrogates not allowed")."""
    import gzip

    with gateway(worker) as gw:
        body = gzip.compress(orjson.dumps(CHAT))
        r = httpx.post(gw.base + "/chat/completions", content=body, timeout=10,
                       headers={"content-type": "application/json", "content-encoding": "gzip"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding", r.text
        assert "gzip" in r.json()["error"]["message"]
        assert not [q for q in worker.received or () if q.path == "/v1/chat/completions"]
        ok = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10,
                        headers={"content-encoding": "identity"})
        assert ok.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_a_body_that_is_not_declared_json_is_refused(worker: ThreadedFakeWorker, content_type: str) -> None:
    """text/plain and the form types are what a web page may send cross-origin without a CORS preflight: taken
    as JSON, any page could make a local open-mode gateway generate."""
    def sent() -> int:
        return len([q for q in worker.received or () if q.path in ("/v1/chat/completions", "/v1/completions",
                                                                  "/tokenize")])

    with gateway(worker) as gw:
        before = sent()
        for route in ("/chat/completions", "/completions", "/tokenize"):
            body = CHAT if route != "/completions" else {"model": "tiny", "prompt": "hi"}
            r = httpx.post(gw.base.removesuffix("/v1") + route if route == "/tokenize" else gw.base + route,
                           content=orjson.dumps(body), headers={"content-type": content_type}, timeout=10)
            assert r.status_code == 415, (route, r.text)
            err = r.json()["error"]
            assert err["code"] == "unsupported_media_type" and "application/json" in err["message"], err
        assert sent() == before  # nothing reached a worker
        for ok_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json", None):
            headers = {} if ok_type is None else {"content-type": ok_type}
            r = httpx.post(gw.base + "/chat/completions", content=orjson.dumps({**CHAT, "stream": False}),
                           headers=headers, timeout=10)
            assert r.status_code == 200, (ok_type, r.text)


def test_region_header(worker: ThreadedFakeWorker) -> None:
    with run_gateway(Settings(upstream=[f"fr=http://127.0.0.1:{worker.port}"], region="fr",
                              region_fallbacks=["uae=fr"])) as gw:
        def post(region: str) -> httpx.Response:
            return httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False},
                              headers={"x-tokengate-region": region}, timeout=10)

        assert post("fr").status_code == 200
        assert post("uae").status_code == 200  # allowed fallback
        r = post("mars")
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_region"
        # two headers naming two regions: refused, not the last one taken (data residency is no guess)
        two = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10,
                         headers=[("x-tokengate-region", "uae"), ("x-tokengate-region", "fr")])
        assert two.status_code == 400 and two.json()["error"]["code"] == "ambiguous_region", two.text
        same = httpx.post(gw.base + "/chat/completions", json={**CHAT, "stream": False}, timeout=10,
                          headers=[("x-tokengate-region", "fr"), ("x-tokengate-region", "fr")])
        assert same.status_code == 200


def test_a_model_card_for_a_region_names_the_regions_a_request_for_it_can_reach() -> None:
    with ThreadedFakeWorker() as fr, ThreadedFakeWorker() as uae, ThreadedFakeWorker() as us, \
            run_gateway(Settings(upstream=[f"fr={fr.url}", f"uae={uae.url}", f"us={us.url}"], region="fr",
                                 region_fallbacks=["fr=uae"], discovery_interval=60.0), ready_timeout=20) as gw:
        def regions(query: str = "") -> list[list[str]]:
            return [m["regions"] for m in httpx.get(gw.base + "/models" + query, timeout=5).json()["data"]]

        assert regions() == [["fr", "uae", "us"]]  # no region: everywhere it is served
        assert regions("?region=fr") == [["fr", "uae"]]  # fr's route (its fallback), not us
        assert regions("?region=us") == [["us"]]


def test_models_list_follows_the_region_a_request_would_use() -> None:
    with ThreadedFakeWorker(model="tiny") as fr, ThreadedFakeWorker(model="other") as uae, \
            run_gateway(Settings(upstream=[f"fr/h100-1x={fr.url}", f"uae/h100-1x={uae.url}"], region="fr",
                                 region_fallbacks=["de=uae"], discovery_interval=60.0), ready_timeout=20) as gw:
        def ids(headers: dict[str, str] | None = None, query: str = "") -> list[str]:
            r = httpx.get(gw.base + "/models" + query, headers=headers)
            assert r.status_code == 200, r.text
            return [m["id"] for m in r.json()["data"]]

        assert ids() == ["other", "tiny"]  # no region: the union
        assert ids({"x-tokengate-region": "fr"}) == ["tiny"]  # as a generation request with this header routes
        assert ids({"x-tokengate-region": "uae"}) == ["other"]
        assert ids({"x-tokengate-region": "de"}) == ["other"]  # through its fallback
        for headers, query, param in (({"x-tokengate-region": "mars"}, "", "x-tokengate-region"),
                                      ({"x-tokengate-region": "fr"}, "?region=mars", "region")):
            r = httpx.get(gw.base + "/models" + query, headers=headers)  # as a generation request naming it is
            assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_region", r.text
            assert r.json()["error"]["param"] == param
        assert ids({"x-tokengate-region": "fr"}, "?region=uae") == ["other"]  # the query names it first
        r = httpx.get(gw.base + "/models/other", headers={"x-tokengate-region": "fr"})
        assert r.status_code == 404, r.text


def test_a_client_that_stops_reading_is_dropped_and_the_worker_request_aborted(worker: ThreadedFakeWorker) -> None:
    worker.options.max_tokens_limit = worker.options.max_model_len = 100_000
    errors: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())  # type: ignore[method-assign]
    with gateway(worker, write_timeout=1.0, max_tokens_cap=50_000) as gw:
        logging.getLogger("uvicorn.error").addHandler(handler)  # (after uvicorn has configured its logging)
        # 30k tokens (~7 MB): more than every socket buffer between the worker and the client holds
        worker.options.token_delay = 0.0002
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, and never read
        host, port = gw.url.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        body = orjson.dumps({**CHAT, "max_tokens": 30_000})
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        t0 = time.monotonic()
        assert worker.wait_for(lambda s: s.aborted == 1, 10), "the worker request was never aborted"
        assert time.monotonic() - t0 < 6
        assert worker.stats.generation_tokens < 30_000  # it never got to the end
        assert metric_sum(scrape(gw.url + "/metrics"), "tokengate_write_stalls_total") == 1
        sock.settimeout(5)
        try:  # the gateway closed the connection (reset: the data the client never read was thrown away)
            while sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        sock.close()
        worker.options.token_delay = 0.0
        assert httpx.post(gw.base + "/chat/completions", json=CHAT, timeout=10).status_code == 200
    logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, errors  # a dropped client is no server error ("ASGI callable returned without completing")


def test_caps_hold_exactly_under_concurrent_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Checklist 15 under load: 150 concurrent requests of three kinds against a 256-token window, counted with
    the model's own tokenizer (the fake worker reports a real model root, so the gateway counts locally)."""
    from app.tinymodel import build_tiny_model
    from app.tokenizer import LocalTokenizer

    root = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tok = LocalTokenizer(root)

    def prompt_tokens(text: str) -> int:
        return tok.count(tok.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)

    short, near, over = "hello there", "word " * 40, "word " * 400
    n_near = prompt_tokens(near)
    assert n_near + 200 > 256 and prompt_tokens(over) > 256
    with ThreadedFakeWorker(root=str(root), max_model_len=256, record=True) as w, gateway(w) as gw:
        async def one(client: httpx.AsyncClient, kind: str) -> tuple[str, httpx.Response]:
            text = {"short": short, "near": near, "over": over}[kind]
            body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 200,
                    "stream": False}
            return kind, await client.post(gw.base + "/chat/completions", json=body)

        async def run() -> list[tuple[str, httpx.Response]]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
                return await asyncio.gather(*(one(client, ("short", "near", "over")[i % 3]) for i in range(150)))

        results = asyncio.run(run())
    for kind, r in results:
        if kind == "over":
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        elif kind == "near":
            assert r.status_code == 200 and r.headers["x-tokengate-max-tokens-clamped"] == "200"
            assert r.json()["usage"]["completion_tokens"] == 256 - n_near
        else:
            assert r.status_code == 200 and "x-tokengate-max-tokens-clamped" not in r.headers
            assert r.json()["usage"]["completion_tokens"] == 200
    sent = [req.json()["max_tokens"] for req in w.received if req.path == "/v1/chat/completions"]
    assert set(sent) == {200, 256 - n_near}  # nothing over the window ever reached the worker


def test_a_configured_tokenizer_counts_prompts_of_a_worker_on_another_machine(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # a worker whose model path is not on this machine (no root): --tokenizer MODEL=PATH counts here, exactly,
    # and the worker sees no /tokenize call
    from app.tinymodel import build_tiny_model
    from app.tokenizer import LocalTokenizer

    root = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tok = LocalTokenizer(root)
    messages = [{"role": "user", "content": "word " * 30}]
    n = tok.count(tok.render_chat(messages), add_special_tokens=False)
    with ThreadedFakeWorker(max_model_len=n + 10, record=True) as w, \
            gateway(w, tokenizers=[f"tiny={root}"]) as gw:
        r = httpx.post(gw.base + "/chat/completions", timeout=10,
                       json={"model": "tiny", "messages": messages, "max_tokens": 50, "stream": False})
        assert r.status_code == 200 and r.headers["x-tokengate-max-tokens-clamped"] == "50"
        assert r.json()["usage"]["completion_tokens"] == 10  # exactly what the window leaves
        too_long = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 40}]}
        r = httpx.post(gw.base + "/chat/completions", json=too_long, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert not [req for req in w.received if req.path == "/tokenize"]


def test_what_vllm_hands_the_template_besides_messages_is_counted_by_the_worker(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """With a local tokenizer, a request whose template input goes beyond plain messages (an empty tools list
    included: templates test "tools is not none"; documents; reasoning_effort, which vLLM turns into template
    kwargs; a role vLLM rewrites) is counted by the worker, with what vLLM would render."""
    from app.tinymodel import build_tiny_model

    root = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    plain = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": False}
    with ThreadedFakeWorker(record=True) as w, gateway(w, tokenizers=[f"tiny={root}"]) as gw:
        def counted(extra: dict[str, Any]) -> list[dict[str, Any]]:
            before = len(w.received or ())
            r = httpx.post(gw.base + "/chat/completions", json={**plain, **extra}, timeout=10)
            assert r.status_code == 200, r.text
            return [q.json() for q in list(w.received or ())[before:] if q.path == "/tokenize"]

        assert counted({}) == []
        assert counted({"tools": []})[0]["tools"] == []
        assert counted({"documents": [{"text": "d"}]})[0]["documents"] == [{"text": "d"}]
        (payload,) = counted({"reasoning_effort": "none"})
        assert payload["chat_template_kwargs"] == {"reasoning_effort": "none", "enable_thinking": False}
        assert len(counted({"messages": [{"role": "developer", "content": "be brief"},
                                         {"role": "user", "content": "hi"}]})) == 1


def test_a_tokenizer_path_without_a_tokenizer_is_refused_at_start(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Settings(upstream=["http://127.0.0.1:1"], tokenizers=[f"tiny={tmp_path}"])
    with pytest.raises(ValueError, match="MODEL=PATH"):
        Settings(upstream=["http://127.0.0.1:1"], tokenizers=["tiny"])


class _Responses:
    """httptools callbacks: the responses on one connection, parsed in order (chunked or Content-Length)."""

    def __init__(self) -> None:
        self.done: list[httpx.Response] = []
        self._headers: list[tuple[str, str]] = []
        self._body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append(httpx.Response(self.parser.get_status_code(), headers=self._headers, content=self._body))
        self._headers, self._body = [], b""


def _read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> list[httpx.Response]:
    """Read ``count`` responses off one connection; a malformed one (a missing terminator, a stray chunk) fails
    the parse, and bytes past the last one stay unread."""
    got = _Responses()
    sock.settimeout(timeout)
    while len(got.done) < count:
        data = sock.recv(65536)
        if not data:
            break
        got.parser.feed_data(data)
    return got.done


def _raw(body: dict[str, Any], extra: str = "") -> bytes:
    data = orjson.dumps(body)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{extra}"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


def test_responses_written_straight_to_the_socket_keep_the_connection_usable(worker: ThreadedFakeWorker) -> None:
    # streams and JSON answers bypass the ASGI send (one write with the head): the connection must stay a valid
    # HTTP/1.1 keep-alive connection, also with requests pipelined behind each other
    with gateway(worker) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_raw(CHAT) + _raw({**CHAT, "stream": False}) + _raw({**CHAT, "max_tokens": 3}))
            got = _read_responses(sock, 3)
            assert [r.status_code for r in got] == [200, 200, 200]
            assert events(got[0].text)[-1] == "[DONE]" and len(events(got[0].text)) == 10
            assert orjson.loads(got[1].content)["usage"]["completion_tokens"] == 8
            assert got[1].headers["content-length"] == str(len(got[1].content))
            assert len(events(got[2].text)) == 1 + 3 + 1
            sock.sendall(_raw(CHAT, "connection: close\r\n"))  # the same connection, once more, then closed
            last = _read_responses(sock, 1)
            assert last[0].status_code == 200 and last[0].headers["connection"] == "close"
            assert sock.recv(1) == b""  # closed by the gateway after the response
