"""The fake vLLM worker (bench/fakeworker.py) on a real loopback socket: SSE format, counters, faults."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.fakeworker import FakeWorker, ThreadedFakeWorker


@pytest.fixture
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker() as w:
        yield w


def _request(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    raw = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {len(raw)}\r\n"
    return head.encode() + b"content-type: application/json\r\n\r\n" + raw


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(65536):
        parts.append(data)
    return b"".join(parts)


def _exchange(port: int, method: str, path: str, body: dict[str, Any] | None = None
              ) -> tuple[int, dict[str, str], list[bytes], bool]:
    """One request on a fresh connection; returns status, headers, HTTP chunks (or the body), and whether the
    chunked body was terminated."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_request(method, path, body))
        raw = _read_all(s)
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if headers.get("transfer-encoding") != "chunked":
        return status, headers, [rest], True
    chunks, terminated = [], False
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            terminated = True
            break
        chunks.append(rest[:size])
        assert rest[size: size + 2] == b"\r\n"
        rest = rest[size + 2:]
    return status, headers, chunks, terminated


def _chat(max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hello there, how are you?"}],
            "max_tokens": max_tokens, "stream": True, **extra}


def _events(chunks: list[bytes]) -> list[bytes]:
    for c in chunks:  # each SSE event is its own HTTP chunk
        assert c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"\n\n") == 1, c
    return [c[6:-2] for c in chunks]


def test_chat_stream_format_with_usage(worker: ThreadedFakeWorker) -> None:
    status, headers, chunks, terminated = _exchange(worker.port, "POST", "/v1/chat/completions",
                                                    _chat(5, stream_options={"include_usage": True}))
    assert status == 200 and terminated
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    events = _events(chunks)
    assert len(events) == 5 + 1 + 1 + 1  # tokens + role + usage + DONE
    assert events[-1] == b"[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert objs[0]["object"] == "chat.completion.chunk" and objs[0]["model"] == "tiny"
    tokens = objs[1:6]
    assert all(o["choices"][0]["delta"]["content"] for o in tokens)
    assert [o["choices"][0]["finish_reason"] for o in tokens] == [None] * 4 + ["length"]
    assert "stop_reason" in tokens[-1]["choices"][0] and "stop_reason" not in tokens[0]["choices"][0]
    usage = objs[6]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    assert len({o["id"] for o in objs}) == 1 and objs[0]["id"].startswith("chatcmpl-")
    assert worker.stats.requests == 1 and worker.stats.completed == 1 and worker.stats.in_flight == 0


def test_usage_only_when_asked_and_max_tokens_honoured(worker: ThreadedFakeWorker) -> None:
    _, _, chunks, _ = _exchange(worker.port, "POST", "/v1/chat/completions", _chat(3))
    events = _events(chunks)
    assert len(events) == 1 + 3 + 1
    assert all(b'"usage"' not in e for e in events)
    worker.options.tokens = 2  # fewer than asked: the model "stopped"
    _, _, chunks, _ = _exchange(worker.port, "POST", "/v1/chat/completions", _chat(7))
    events = _events(chunks)
    assert len(events) == 1 + 2 + 1
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"


def test_completions_stream(worker: ThreadedFakeWorker) -> None:
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 4, "stream": True}
    _, _, chunks, terminated = _exchange(worker.port, "POST", "/v1/completions", body)
    events = _events(chunks)
    assert terminated and len(events) == 4 + 1
    objs = [json.loads(e) for e in events[:-1]]
    assert {o["object"] for o in objs} == {"text_completion"}
    assert all(o["choices"][0]["text"] for o in objs)
    assert objs[-1]["choices"][0]["finish_reason"] == "length"


def test_non_stream_json(worker: ThreadedFakeWorker) -> None:
    status, headers, (body,), _ = _exchange(worker.port, "POST", "/v1/chat/completions", _chat(6, stream=False))
    assert status == 200 and headers["content-type"] == "application/json"
    obj = json.loads(body)
    assert obj["object"] == "chat.completion"
    choice = obj["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert obj["usage"]["completion_tokens"] == 6
    _, _, (body,), _ = _exchange(worker.port, "POST", "/v1/completions",
                                 {"model": "tiny", "prompt": "abcdefgh", "max_tokens": 2})
    obj = json.loads(body)
    assert obj["object"] == "text_completion" and obj["usage"] == {"prompt_tokens": 2, "total_tokens": 4,
                                                                   "completion_tokens": 2}


def test_other_endpoints(worker: ThreadedFakeWorker) -> None:
    status, _, (body,), _ = _exchange(worker.port, "GET", "/v1/models")
    card = json.loads(body)["data"][0]
    assert status == 200 and card["id"] == "tiny" and card["max_model_len"] == 2048
    assert card["root"] == "/nonexistent/tiny"
    assert _exchange(worker.port, "GET", "/health")[0] == 200
    _, _, (body,), _ = _exchange(worker.port, "POST", "/tokenize", {"model": "tiny", "prompt": "x" * 40})
    tok = json.loads(body)
    assert tok["count"] == 10 and len(tok["tokens"]) == 10 and tok["max_model_len"] == 2048
    _, _, (body,), _ = _exchange(worker.port, "GET", "/metrics")
    assert b'vllm:num_requests_running{model_name="tiny"} 0' in body
    assert _exchange(worker.port, "GET", "/nope")[0] == 404


def test_keep_alive_and_recording(worker: ThreadedFakeWorker) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=5)
    for _ in range(3):
        conn.request("POST", "/v1/chat/completions", json.dumps(_chat(2)), {"authorization": "Bearer k"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().endswith(b"data: [DONE]\n\n")
    conn.close()
    # the worker counts a completion after its last write: the client can have read it a moment before
    assert worker.wait_for(lambda s: s.completed == 3)
    assert worker.stats.connections_total == 1
    assert worker.received is not None
    last = worker.received[-1]
    assert last.path == "/v1/chat/completions" and last.headers["authorization"] == "Bearer k"
    assert last.json()["max_tokens"] == 2


def test_injected_status(worker: ThreadedFakeWorker) -> None:
    worker.options.status = 503
    status, _, (body,), _ = _exchange(worker.port, "POST", "/v1/chat/completions", _chat())
    assert status == 503
    assert json.loads(body)["error"] == {"message": "injected error 503", "type": "ServiceUnavailableError",
                                         "param": None, "code": 503}
    assert _exchange(worker.port, "GET", "/health")[0] == 200  # still looks healthy
    assert worker.stats.failed == 1 and worker.stats.completed == 0


def test_disconnect_counted_as_aborted() -> None:
    with ThreadedFakeWorker(token_delay=0.05) as w:
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as s:
            s.sendall(_request("POST", "/v1/chat/completions", _chat(50)))
            got = b""
            while b"data: " not in got:
                got += s.recv(65536)
            assert w.stats.in_flight == 1
        assert w.wait_for(lambda st: st.aborted == 1 and st.in_flight == 0, timeout=2)
        status, _, (body,), _ = _exchange(w.port, "GET", "/stats")
        stats = json.loads(body)
        assert status == 200
        assert (stats["requests"], stats["completed"], stats["aborted"], stats["in_flight"]) == (1, 0, 1, 0)


def test_fail_after_chunks_closes_mid_stream() -> None:
    with ThreadedFakeWorker(fail_after_chunks=3, token_delay=0.001) as w:
        status, _, chunks, terminated = _exchange(w.port, "POST", "/v1/chat/completions", _chat(10))
        assert status == 200 and not terminated
        assert len(_events(chunks)) == 3
        assert (w.stats.failed, w.stats.completed, w.stats.aborted, w.stats.in_flight) == (1, 0, 0, 0)


def test_stall_after_chunks_keeps_socket_open() -> None:
    with ThreadedFakeWorker(stall_after_chunks=2) as w:
        with socket.create_connection(("127.0.0.1", w.port), timeout=0.3) as s:
            s.sendall(_request("POST", "/v1/chat/completions", _chat(10)))
            got = b""
            with pytest.raises(TimeoutError):
                while True:
                    got += s.recv(65536)
            assert got.count(b"data: ") == 2 and w.stats.in_flight == 1
        assert w.wait_for(lambda st: st.aborted == 1 and st.in_flight == 0, timeout=2)


def test_malformed_event() -> None:
    with ThreadedFakeWorker(malformed=True) as w:
        _, _, chunks, terminated = _exchange(w.port, "POST", "/v1/chat/completions", _chat(4))
    events = _events(chunks)
    assert terminated and len(events) == 1 + 4 + 1 + 1
    bad = []
    for e in events[:-1]:
        try:
            json.loads(e)
        except ValueError:
            bad.append(e)
    assert len(bad) == 1


def test_async_api_paced_timing() -> None:
    async def go() -> tuple[float, float, int]:
        async with FakeWorker(ttft=0.05, token_delay=0.02) as w:
            reader, writer = await asyncio.open_connection("127.0.0.1", w.port)
            t0 = time.perf_counter()
            writer.write(_request("POST", "/v1/chat/completions", _chat(5)))
            first = None
            data = b""
            while chunk := await reader.read(65536):
                if first is None and b'"content":" ' in chunk:
                    first = time.perf_counter() - t0
                data += chunk
            writer.close()
            assert await w.wait_for(lambda st: st.completed == 1)
            assert first is not None
            return first, time.perf_counter() - t0, data.count(b"data: ")

    ttft, total, events = asyncio.run(go())
    assert 0.05 <= ttft < 0.5
    assert 0.05 + 4 * 0.02 <= total < 1.0
    assert events == 1 + 5 + 1


def test_the_command_line_sets_every_option() -> None:
    """The CLI builds the worker's options from its flags (a managed worker in the tests is this process): every
    option has one, the newer ones included."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.fakeworker", "--port", str(port), "--status", "429",
                             "--retry-after", "3", "--no-tokenize"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert httpx.post(f"http://127.0.0.1:{port}/tokenize", json={}, timeout=10).status_code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
