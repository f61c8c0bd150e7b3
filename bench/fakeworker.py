"""A fast fake vLLM OpenAI worker on loopback: asyncio Protocol + httptools, precomputed SSE, fault injection.

Serves ``POST /v1/chat/completions`` and ``POST /v1/completions`` (stream and non-stream, byte-compatible with vLLM
0.32's chunks), ``GET /v1/models``, ``GET /health``, ``POST /tokenize``, ``GET /metrics`` and ``GET /stats`` (this
fake's own counters).  Timing: response headers at once, role + first token at ``ttft``, then one token (one HTTP
chunk, one write) every ``token_delay``; the last token, the usage event (only with ``stream_options.include_usage``)
and ``[DONE]`` go together.  With no delays the whole response is one write.

Token count: ``tokens`` if set, else the request's ``max_tokens``/``max_completion_tokens``, else ``default_tokens``;
never more than the request's ``max_tokens`` nor ``max_tokens_limit``.  ``finish_reason`` is ``"length"`` when the
request's ``max_tokens`` was reached, ``"stop"`` otherwise.

Fault injection (generation endpoints only; the rest keep working so the worker still looks healthy): ``status``
answers every generation request with an OpenAI-shaped error of that status; ``fail_after_chunks=K`` closes the
socket after K SSE events (a worker dying mid-stream; K=0: right after the headers); ``stall_after_chunks=K`` stops
after K events and keeps the socket open; ``error_after_chunks=K`` sends an in-band error event after K events and
then ``[DONE]``, as vLLM does when generation fails mid-stream; ``malformed`` inserts one non-JSON ``data:`` event
mid-stream. ``idle_timeout`` closes keep-alive connections idle that long (uvicorn's is 5 s).

``/stats`` counts generation requests only: requests, completed, aborted (client went away before the end),
failed (injected faults), in_flight, plus connection and token totals.

In-process use::

    async with FakeWorker(ttft=0.02, token_delay=0.01) as w:   # port 0: an ephemeral port
        ... w.url ...; await w.wait_for(lambda s: s.aborted == 1)

    with ThreadedFakeWorker(tokens=4) as w:                       # for sync tests: its own loop in a thread
        ... w.url ...; assert w.wait_for(lambda s: s.completed == 1)

CLI: ``python -m bench.fakeworker --port 8001 --ttft 0.02 --token-delay 0.01`` (``--help`` lists the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools
import orjson

_DONE = b"e\r\ndata: [DONE]\n\n\r\n"  # framed as one HTTP chunk
_TERM = b"0\r\n\r\n"
_FINGERPRINT = "vllm-0.32.0-eea9a85b"
_WORDS = (" luto", " the", " quiet", " river", " runs", " under", " a", " stone", " bridge", " and", " sings")
_SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n"
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 413: "RequestEntityTooLarge", 422: "UnprocessableEntityError",
                429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            413: "Payload Too Large", 422: "Unprocessable Entity", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class FakeWorkerOptions:
    """Read per request: change them on a running worker (``w.options.status = 503``) between requests."""

    ttft: float = 0.0
    token_delay: float = 0.0
    tokens: int | None = None
    max_tokens_limit: int = 2048
    default_tokens: int = 16
    model: str = "tiny"
    root: str | None = None
    max_model_len: int = 2048
    fail_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    error_after_chunks: int | None = None
    status: int | None = None
    retry_after: int | None = None  # with ``status``: a Retry-After header on the error
    tokenize: bool = True  # False: no POST /tokenize (404), as on servers that aren't vLLM
    malformed: bool = False
    idle_timeout: float | None = None


@dataclass
class FakeWorkerStats:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    failed: int = 0
    in_flight: int = 0
    connections: int = 0
    connections_total: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def _frame(event: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(event), event)


def _sse(obj: dict[str, Any]) -> bytes:
    return _frame(b"data: " + orjson.dumps(obj) + b"\n\n")


def _error_body(status: int, message: str, param: str | None = None) -> bytes:
    etype = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return orjson.dumps({"error": {"message": message, "type": etype, "param": param, "code": status}})


def _estimate_tokens(obj: dict[str, Any]) -> int:
    """A cheap deterministic stand-in for a tokenizer: UTF-8 bytes of the text / 4 (+3 per chat message)."""
    total, extra = 0, 0
    messages = obj.get("messages")
    if isinstance(messages, list):
        extra = 3 * len(messages)
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content.encode())
            elif isinstance(content, list):
                total += sum(len(str(p.get("text", "")).encode()) for p in content if isinstance(p, dict))
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        total += len(prompt.encode())
    elif isinstance(prompt, list):
        if prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        total += sum(len(p.encode()) for p in prompt if isinstance(p, str))
    return max(1, (total + 3) // 4 + extra)


@dataclass(frozen=True, slots=True)
class _Script:
    """Precomputed stream for one (kind, model, n, finish): ``steps[k]`` is written at ttft + k * token_delay."""

    rid: str
    created: int
    obj: str
    steps: tuple[bytes, ...]
    events: tuple[bytes, ...]
    zero: bytes  # all steps joined (zero-delay fast path)
    text: str


def _build_script(chat: bool, model: str, n: int, finish: str) -> _Script:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    words = [_WORDS[i % len(_WORDS)] for i in range(n)]
    head = {"id": rid, "object": obj, "created": created, "model": model}
    events: list[bytes] = []
    if chat:
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        events.append(_sse({**head, "choices": [role], "prompt_token_ids": None, "prompt_text": None}))
    for i, word in enumerate(words):
        last = i == n - 1
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["delta"] = {"content": word}
        else:
            choice["text"] = word
        choice["logprobs"] = None
        choice["finish_reason"] = finish if last else None
        if last or not chat:
            choice["stop_reason"] = None
        if chat:
            choice["token_ids"] = None
        events.append(_sse({**head, "choices": [choice]}))
    first = 2 if chat else 1
    steps = (b"".join(events[:first]), *events[first:])
    return _Script(rid, created, obj, steps, tuple(events), b"".join(steps), "".join(words))


class _Stream:
    __slots__ = ("steps", "k", "t0", "ttft", "delay", "end", "handle", "tokens", "keep_alive")

    def __init__(self, steps: list[bytes], end: str, t0: float, opts: FakeWorkerOptions, tokens: int,
                 keep_alive: bool) -> None:
        self.steps = steps
        self.k = 0
        self.t0 = t0
        self.ttft = opts.ttft
        self.delay = opts.token_delay
        self.end = end  # "finish" | "close" | "stall"
        self.handle: asyncio.TimerHandle | None = None
        self.tokens = tokens
        self.keep_alive = keep_alive


class _Conn(asyncio.Protocol):
    def __init__(self, worker: FakeWorker) -> None:
        self.w = worker
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.busy = False
        self.queue: deque[tuple[bytes, bytes, bytes, bool, list[tuple[bytes, bytes]]]] = deque()
        self.stream: _Stream | None = None
        self.closed = False
        self.idle_handle: asyncio.TimerHandle | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        self.w._conns.add(self)
        st = self.w.stats
        st.connections += 1
        st.connections_total += 1
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.w._conns.discard(self)
        self.w.stats.connections -= 1
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        s = self.stream
        if s is not None:
            self.stream = None
            if s.handle is not None:
                s.handle.cancel()
            self.w.stats.aborted += 1
            self.w.stats.in_flight -= 1
            if s.end != "json":  # tokens already sent count as generated, as in vLLM
                self.w.stats.generation_tokens += min(s.k, s.tokens)

    def data_received(self, data: bytes) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._simple(400, _error_body(400, "malformed HTTP request"), b"application/json", False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = (self.parser.get_method(), self.url, b"".join(self.body), self.parser.should_keep_alive(), self.headers)
        if self.busy:
            self.queue.append(req)
        else:
            self._handle(*req)

    # requests
    def _handle(self, method: bytes, url: bytes, body: bytes, keep_alive: bool,
                headers: list[tuple[bytes, bytes]]) -> None:
        self.busy = True
        path = url.partition(b"?")[0]
        w = self.w
        if w.received is not None:
            w.received.append(ReceivedRequest(method.decode(), path.decode("latin-1"),
                                              {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers},
                                              body))
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            self._generate(path == b"/v1/chat/completions", body, keep_alive)
        elif method == b"GET" and path == b"/health":
            self._simple(200, b"", b"application/json", keep_alive)
        elif method == b"GET" and path == b"/stats":
            self._simple(200, orjson.dumps(dataclasses.asdict(w.stats)), b"application/json", keep_alive)
        elif method == b"GET" and path == b"/v1/models":
            self._simple(200, w._models_body(), b"application/json", keep_alive)
        elif method == b"GET" and path == b"/metrics":
            self._simple(200, w._metrics_body(), b"text/plain; version=0.0.4; charset=utf-8", keep_alive)
        elif method == b"POST" and path == b"/tokenize" and w.options.tokenize:
            self._tokenize(body, keep_alive)
        else:
            msg = f"no route for {method.decode()} {path.decode('latin-1')}"
            self._simple(404, _error_body(404, msg), b"application/json", keep_alive)

    def _tokenize(self, body: bytes, keep_alive: bool) -> None:
        try:
            obj = orjson.loads(body)
            assert isinstance(obj, dict)
        except Exception:
            self._simple(400, _error_body(400, "request body is not a JSON object"), b"application/json", keep_alive)
            return
        n = _estimate_tokens(obj)
        out = {"count": n, "max_model_len": self.w.options.max_model_len, "tokens": list(range(n)), "token_strs": None}
        self._simple(200, orjson.dumps(out), b"application/json", keep_alive)

    def _generate(self, chat: bool, body: bytes, keep_alive: bool) -> None:
        w = self.w
        opts = w.options
        st = w.stats
        st.requests += 1
        if opts.status is not None:
            st.failed += 1
            extra = b"" if opts.retry_after is None else b"retry-after: %d\r\n" % opts.retry_after
            self._simple(opts.status, _error_body(opts.status, f"injected error {opts.status}"), b"application/json",
                         keep_alive, extra)
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            st.failed += 1
            self._simple(400, _error_body(400, "request body is not a JSON object"), b"application/json", keep_alive)
            return
        model = obj.get("model")
        if not isinstance(model, str):
            model = opts.model
        max_tokens = obj.get("max_completion_tokens") if chat else None
        if max_tokens is None:
            max_tokens = obj.get("max_tokens")
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            st.failed += 1
            self._simple(400, _error_body(400, "max_tokens must be at least 1", "max_tokens"), b"application/json",
                         keep_alive)
            return
        n = opts.tokens if opts.tokens is not None else max_tokens if max_tokens is not None else opts.default_tokens
        if max_tokens is not None:
            n = min(n, max_tokens)
        n = max(1, min(n, opts.max_tokens_limit))
        finish = "length" if max_tokens is not None and n >= max_tokens else "stop"
        script = w._script(chat, model, n, finish)
        prompt_tokens = _estimate_tokens(obj)
        st.in_flight += 1
        st.prompt_tokens += prompt_tokens
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        t0 = self.loop.time()
        if obj.get("stream") is not True:
            self._start(_Stream([self._full_body(chat, script, model, usage, finish)], "json", t0, opts, n, keep_alive),
                        opts.ttft + (n - 1) * opts.token_delay)
            return
        so = obj.get("stream_options")
        tail = [_DONE]
        if isinstance(so, dict) and so.get("include_usage") is True:
            tail.insert(0, _sse({"id": script.rid, "object": script.obj, "created": script.created, "model": model,
                                 "choices": [], "usage": usage, "system_fingerprint": _FINGERPRINT}))
        faulty = (opts.malformed or opts.fail_after_chunks is not None or opts.stall_after_chunks is not None
                  or opts.error_after_chunks is not None)
        if not faulty and opts.ttft <= 0 and opts.token_delay <= 0:  # fast path: one write
            assert self.transport is not None
            self.transport.write(b"".join((_SSE_HEAD, b"\r\n" if keep_alive else b"connection: close\r\n\r\n",
                                           script.zero, *tail, _TERM)))
            st.in_flight -= 1
            st.completed += 1
            st.generation_tokens += n
            self._done(keep_alive)
            return
        if faulty:
            steps, end = _faulty_steps(script, chat, tail, opts)
        else:
            steps, end = list(script.steps), "finish"
            steps[-1] = b"".join((steps[-1], *tail, _TERM))
        head = _SSE_HEAD + (b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        if opts.ttft > 0:
            assert self.transport is not None
            self.transport.write(head)  # headers at once, like vLLM's StreamingResponse
        else:
            steps[0] = head + steps[0]
        self._start(_Stream(steps, end, t0, opts, n, keep_alive), opts.ttft)

    def _full_body(self, chat: bool, script: _Script, model: str, usage: dict[str, Any], finish: str) -> bytes:
        head = {"id": script.rid, "object": "chat.completion" if chat else "text_completion",
                "created": script.created, "model": model}
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": script.text, "refusal": None,
                                       "annotations": None, "audio": None, "function_call": None, "tool_calls": [],
                                       "reasoning_content": None}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish,
                                      "stop_reason": None}
            out = {**head, "choices": [choice], "service_tier": None, "system_fingerprint": None,
                   "usage": {**usage, "prompt_tokens_details": None}, "prompt_logprobs": None,
                   "kv_transfer_params": None}
        else:
            choice = {"index": 0, "text": script.text, "logprobs": None, "finish_reason": finish,
                      "stop_reason": None, "prompt_logprobs": None}
            out = {**head, "choices": [choice], "usage": usage, "kv_transfer_params": None}
        return orjson.dumps(out)

    def _start(self, s: _Stream, first_at: float) -> None:
        self.stream = s
        if first_at <= 0:
            self._tick()
        else:
            s.handle = self.loop.call_at(s.t0 + first_at, self._tick)

    def _tick(self) -> None:
        s = self.stream
        if s is None or self.closed or self.transport is None:
            return
        s.handle = None
        st = self.w.stats
        if s.end == "json":
            self.stream = None
            st.in_flight -= 1
            st.completed += 1
            st.generation_tokens += s.tokens
            self._simple(200, s.steps[0], b"application/json", s.keep_alive)
            return
        now = self.loop.time()
        steps, k, nsteps = s.steps, s.k, len(s.steps)
        base = s.t0 + s.ttft
        j = k + 1
        while j < nsteps and base + j * s.delay <= now:
            j += 1
        self.transport.write(steps[k] if j == k + 1 else b"".join(steps[k:j]))
        s.k = j
        if j < nsteps:
            s.handle = self.loop.call_at(base + j * s.delay, self._tick)
            return
        if s.end == "stall":
            return  # stays in flight until the client goes away
        self.stream = None
        st.in_flight -= 1
        if s.end == "close":
            st.failed += 1
            self.transport.close()
            return
        st.completed += 1
        st.generation_tokens += s.tokens
        self._done(s.keep_alive)

    def _simple(self, status: int, body: bytes, ctype: bytes, keep_alive: bool, extra: bytes = b"") -> None:
        if self.transport is None or self.closed:
            return
        reason = _REASONS.get(status, "Status").encode()
        conn = b"" if keep_alive else b"connection: close\r\n"
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n%s"
                             % (status, reason, ctype, len(body), conn, extra, body))
        self._done(keep_alive)

    def _done(self, keep_alive: bool) -> None:
        self.busy = False
        if not keep_alive:
            if self.transport is not None:
                self.transport.close()
            return
        if self.queue:
            self._handle(*self.queue.popleft())
        else:
            self._arm_idle()

    def _arm_idle(self) -> None:
        timeout = self.w.options.idle_timeout
        if timeout is not None and self.transport is not None:
            self.idle_handle = self.loop.call_later(timeout, self.transport.close)


def _faulty_steps(script: _Script, chat: bool, tail: list[bytes], opts: FakeWorkerOptions) -> tuple[list[bytes], str]:
    """The slow path: steps as lists of events, then the fault applied by counting events (tail included)."""
    groups: list[list[bytes]] = [[e] for e in script.events]
    if chat:  # role + first token are one step
        groups[0:2] = [groups[0] + groups[1]]
    groups[-1] = groups[-1] + tail
    if opts.malformed:
        mid = len(groups) // 2
        groups[mid] = [_frame(b'data: {"id": "broken", not json\n\n'), *groups[mid]]
    limit, end = None, "finish"
    if opts.error_after_chunks is not None:  # vLLM's stream generator: the error event, then [DONE] all the same
        events = [e for g in groups for e in g if e != _DONE][: opts.error_after_chunks]
        error = _frame(b'data: ' + orjson.dumps({"error": {
            "message": "injected engine failure", "type": "InternalServerError", "param": None, "code": 500}})
            + b"\n\n")
        return [b"".join(events), b"".join((error, _DONE, _TERM))], "finish"
    if opts.fail_after_chunks is not None:
        limit, end = opts.fail_after_chunks, "close"
    elif opts.stall_after_chunks is not None:
        limit, end = opts.stall_after_chunks, "stall"
    if limit is None or limit >= sum(len(g) for g in groups):
        groups[-1].append(_TERM)
        return [b"".join(g) for g in groups], "finish"
    steps: list[bytes] = []
    count = 0
    for g in groups:
        take = g[: max(0, limit - count)]
        count += len(take)
        if take:
            steps.append(b"".join(take))
        if count >= limit:
            break
    return steps or [b""], end


class FakeWorker:
    """The fake worker, in-process on the running loop. ``async with FakeWorker(...) as w: w.url``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, record: bool = True, **options: Any) -> None:
        self.host = host
        self.port = port
        self.options = FakeWorkerOptions(**options)
        self.stats = FakeWorkerStats()
        self.received: deque[ReceivedRequest] | None = deque(maxlen=256) if record else None
        self._record = record
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._scripts: dict[tuple[bool, str, int, str], _Script] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FakeWorker:
        proto = _RecordingConn if self._record else _Conn
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: proto(self), self.host, self.port, backlog=4096,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def __aenter__(self) -> FakeWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reset_stats(self) -> None:
        in_flight, conns = self.stats.in_flight, self.stats.connections
        self.stats = FakeWorkerStats(in_flight=in_flight, connections=conns)
        if self.received is not None:
            self.received.clear()

    async def wait_for(self, predicate: Callable[[FakeWorkerStats], bool], timeout: float = 5.0) -> bool:
        """Poll the counters until ``predicate(stats)`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate(self.stats):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def _script(self, chat: bool, model: str, n: int, finish: str) -> _Script:
        key = (chat, model, n, finish)
        s = self._scripts.get(key)
        if s is None:
            if len(self._scripts) > 512:
                self._scripts.clear()
            s = self._scripts[key] = _build_script(chat, model, n, finish)
        return s

    def _models_body(self) -> bytes:
        o = self.options
        created = int(time.time())
        perm = {"id": "modelperm-fake", "object": "model_permission", "created": created, "allow_create_engine": False,
                "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}
        card = {"id": o.model, "object": "model", "created": created, "owned_by": "vllm",
                "root": o.root or f"/nonexistent/{o.model}", "parent": None, "max_model_len": o.max_model_len,
                "permission": [perm]}
        return orjson.dumps({"object": "list", "data": [card]})

    def _metrics_body(self) -> bytes:
        s, m = self.stats, self.options.model
        lines = [
            "# TYPE vllm:num_requests_running gauge", f'vllm:num_requests_running{{model_name="{m}"}} {s.in_flight}',
            "# TYPE vllm:num_requests_waiting gauge", f'vllm:num_requests_waiting{{model_name="{m}"}} 0',
            "# TYPE vllm:kv_cache_usage_perc gauge", f'vllm:kv_cache_usage_perc{{model_name="{m}"}} 0.0',
            "# TYPE vllm:prompt_tokens_total counter",
            f'vllm:prompt_tokens_total{{model_name="{m}"}} {s.prompt_tokens}',
            "# TYPE vllm:generation_tokens_total counter",
            f'vllm:generation_tokens_total{{model_name="{m}"}} {s.generation_tokens}',
        ]
        return ("\n".join(lines) + "\n").encode()


class _RecordingConn(_Conn):
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


async def start_fake_worker(**kwargs: Any) -> FakeWorker:
    """Start a FakeWorker on the running loop (same keywords as FakeWorker); ``await w.stop()`` when done."""
    return await FakeWorker(**kwargs).start()


class ThreadedFakeWorker:
    """The fake worker on its own event loop in a daemon thread, for sync tests. ``with ThreadedFakeWorker() as w:``.

    ``options`` may be changed between requests; ``stats`` is read without locking (ints; good enough for tests).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.worker = FakeWorker(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.worker.url

    @property
    def port(self) -> int:
        return self.worker.port

    @property
    def options(self) -> FakeWorkerOptions:
        return self.worker.options

    @property
    def stats(self) -> FakeWorkerStats:
        return self.worker.stats

    @property
    def received(self) -> deque[ReceivedRequest] | None:
        return self.worker.received

    def start(self) -> ThreadedFakeWorker:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.worker.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.worker.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fakeworker", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            self._loop = self._thread = None

    def reset_stats(self) -> None:
        self.worker.reset_stats()

    def wait_for(self, predicate: Callable[[FakeWorkerStats], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self.worker.stats):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def __enter__(self) -> ThreadedFakeWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fast fake vLLM OpenAI worker (see module docstring).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0: pick a free port (printed on stdout)")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds from request to role + first token")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    p.add_argument("--tokens", type=int, default=None, help="tokens per response (default: the request's max_tokens)")
    p.add_argument("--max-tokens-limit", type=int, default=2048)
    p.add_argument("--default-tokens", type=int, default=16, help="tokens when the request has no max_tokens")
    p.add_argument("--model", default="tiny")
    p.add_argument("--root", default=None, help="model path /v1/models reports (a real one lets the gateway count "
                                                "prompts locally)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--fail-after-chunks", type=int, default=None, help="close the socket after K SSE events")
    p.add_argument("--stall-after-chunks", type=int, default=None, help="stop after K SSE events, keep socket open")
    p.add_argument("--error-after-chunks", type=int, default=None,
                   help="after K SSE events an in-band error event, then [DONE] (as vLLM ends a failed stream)")
    p.add_argument("--status", type=int, default=None, help="answer every generation request with this error")
    p.add_argument("--retry-after", type=int, default=None, help="with --status: a Retry-After header of S seconds")
    p.add_argument("--no-tokenize", dest="tokenize", action="store_false",
                   help="no POST /tokenize (404), as on servers that aren't vLLM")
    p.add_argument("--malformed", action="store_true", help="send one non-JSON data event mid-stream")
    p.add_argument("--idle-timeout", type=float, default=None, help="close keep-alive connections idle this long")
    p.add_argument("--record", action="store_true", help="keep the last 256 requests (in-process use only)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    a = p.parse_args(argv)
    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(FakeWorkerOptions)}

    async def serve() -> None:
        w = await FakeWorker(host=a.host, port=a.port, record=a.record, **opts).start()
        print(f"fakeworker listening on {w.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await w.stop()

    if a.loop == "uvloop":
        import uvloop

        uvloop.run(serve())
    else:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
