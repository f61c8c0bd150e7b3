"""One request/response exchange: its state as it moves through the proxy, and the three ways to answer.

- ``answer_stream``: relay the worker's SSE to a streaming client;
- ``answer_collected``: build one JSON object from the worker's stream for a non-streaming client;
- ``answer_unary``: pass a non-streaming worker answer through (beam search; all of them with
  ``--non-stream-upstream unary``).
Each fills in the request's metrics record and leaves the worker connection released or aborted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import orjson

from .admission import Slot
from .aggregate import StreamAggregator
from .auth import OPEN, Principal
from .caps import Decision
from .clientwriter import ClientWriter
from .errors import GatewayError, UpstreamError, UpstreamStatus, UpstreamTimeout, status_of
from .limits import Ticket
from .metrics import GatewayMetrics, RequestRecord
from .protocol import ParsedRequest, usage_counts
from .sse import SSEParser, SSEState
from .streaming import RelayBatch, Splice, collect, open_splice, relay
from .upstream import UpstreamClosed, UpstreamProtocolError, UpstreamResponse
from .workers.registry import Worker

WORKER_HEADER = b"x-tokengate-worker"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(slots=True, eq=False)
class Exchange:
    task: asyncio.Task[Any] | None
    started: bool = False
    done: bool = False
    client_gone: bool = False
    worker: Worker | None = None
    resp: UpstreamResponse | None = None
    request_id: str = ""
    principal: Principal = OPEN
    ticket: Ticket | None = None
    slot: Slot | None = None
    parser: SSEParser | None = None
    decision: Decision | None = None
    stream: bool = True
    gauge: Any = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    sending_since: float = 0.0  # monotonic time a write to the client began and has not finished; 0: none
    client: ClientWriter | None = None  # direct writes to the client's connection, where the server offers them
    relay: Splice | None = None  # a stream's relay, when taken on before the worker's first byte (open_relay)
    awaiting_head: bool = False  # the request went to ``worker``, which has not answered its head yet
    reached: bool = False  # a worker answered it, or may be working on it (limits: it counts as one of the key's)

    @property
    def sent_to_worker(self) -> bool:
        """A worker answered it, or may be working on it (not: queued, refused, or every worker unreachable)."""
        return self.reached or self.awaiting_head

    def stalled(self, since: float) -> None:
        self.sending_since = since

    def begun(self) -> bool:
        """Something of the response has gone to the client (errors from here on go in-band): ``started``, or
        the relay wrote the head from a worker callback before the task could say so."""
        return self.started or (self.client is not None and not self.client.can_start())

    def client_lost(self) -> None:
        """The client's connection is gone: stop the exchange wherever it waits (the proxy aborts the worker
        request on the way out)."""
        if not self.done and self.task is not None:
            self.client_gone = True
            self.task.cancel()

    async def watch_receive(self, receive: Any) -> None:
        """Without a ClientWriter to tell us: wait for the ASGI disconnect message."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_lost()
                return


def error_kind(exc: GatewayError) -> str:
    if isinstance(exc, UpstreamStatus):
        return "status_5xx" if exc.passthrough_status >= 500 else "status_4xx"
    if isinstance(exc, UpstreamTimeout):
        return "connect_timeout" if exc.error_code == "worker_connect_timeout" else "timeout"
    if isinstance(exc, UpstreamClosed):
        return "closed"
    if isinstance(exc, UpstreamProtocolError):
        return "protocol"
    return "unreachable"


def _count_error(metrics: GatewayMetrics, ex: Exchange, exc: GatewayError) -> None:
    w = ex.worker
    metrics.upstream_errors.labels(w.region if w else "", w.preset if w else "", w.name if w else "",
                                   error_kind(exc)).inc()


def can_open_relay(req: ParsedRequest, ex: Exchange) -> bool:
    """A streaming client on a connection the gateway writes to directly: its relay can start before the
    worker's first byte (``open_relay``)."""
    return req.stream and ex.client is not None and ex.client.can_start()


async def open_relay(req: ParsedRequest, ex: Exchange, worker: Worker, *, first_timeout: float,
                     idle_timeout: float, batch: RelayBatch | None = None) -> None:
    """Relay a stream from before the worker's first byte (see ``streaming.open_splice``): the first token
    reaches the client from the worker connection's own callback. Raises what failed before that byte, with
    nothing sent (the caller may try another worker); ``answer_stream`` relays the rest."""
    assert ex.resp is not None and ex.client is not None
    ex.parser = parser = SSEParser(req.include_usage)
    head = SSE_HEADERS + ex.headers + [(WORKER_HEADER, worker.name.encode())]
    try:
        ex.relay = await open_splice(ex.resp, parser, ex.client, head, first_timeout=first_timeout,
                                     idle_timeout=idle_timeout, on_stall=ex.stalled, batch=batch)
    except GatewayError:
        ex.parser = None
        raise
    ex.started = True


async def answer_stream(req: ParsedRequest, first: bytes | None, ex: Exchange, rec: RequestRecord, send: Any, *,
                        metrics: GatewayMetrics, idle_timeout: float) -> GatewayError | None:
    """Relay a stream. Returns the error that cut it short (already sent in-band), if any."""
    resp = ex.resp
    assert resp is not None
    ex.started = True
    if ex.relay is not None:  # open_relay took it on before the first byte (a client it can write to directly)
        sp, ex.relay = ex.relay, None  # (the relay refers back to the exchange: no cycle left behind)
        parser = sp.parser
        await sp.rest()
        err = sp.error
    else:
        ex.parser = parser = SSEParser(req.include_usage)
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS + ex.headers})

        async def tracked(message: dict[str, Any]) -> None:
            # uvicorn's send waits while the client's socket buffer is full: the write watchdog sees how long
            ex.sending_since = monotonic()
            await send(message)
            ex.sending_since = 0.0

        err = await relay(resp, first or b"", parser, tracked, idle_timeout=idle_timeout)
    ex.done = True
    st = parser.state
    record_tokens(rec, st, ex.decision)
    if st.chunks:
        metrics.observe_relay(st.relay_buckets, st.relay_seconds)
    ex.resp = None
    if err is not None:
        rec.status = status_of(err)
        _count_error(metrics, ex, err)
        resp.abort()
        return err
    rec.status = 200
    await finish(resp)
    return None


def record_tokens(rec: RequestRecord, st: SSEState, decision: Decision | None) -> None:
    """What a worker stream cost: its usage where it gave a count, else the content events relayed and the
    gateway's own prompt count (a stream cut short, a worker that sends no usage or no valid one)."""
    rec.first_token, rec.last_token = st.first_token, st.last_token
    prompt, completion = usage_counts(st.usage)
    rec.completion_tokens = st.content_events if completion is None else completion
    rec.prompt_tokens = decision.prompt_tokens if prompt is None and decision is not None else prompt


async def answer_collected(req: ParsedRequest, first: bytes | None, ex: Exchange, rec: RequestRecord, send: Any,
                           *, metrics: GatewayMetrics, idle_timeout: float) -> None:
    """A non-streaming client, a streaming worker: gather the stream into one response object."""
    resp = ex.resp
    assert resp is not None
    agg = StreamAggregator(req.route)
    ex.parser = parser = SSEParser(include_usage=True, sink=agg.add, take=agg.take)
    st = parser.state
    try:
        await collect(resp, first or b"", parser, idle_timeout=idle_timeout)
        try:
            data = orjson.dumps(agg.result())
        except orjson.JSONEncodeError:  # a field nested deeper than orjson writes (it reads 1 024 levels, writes 254)
            raise UpstreamProtocolError("worker sent an answer nested too deep to pass on") from None
    except GatewayError as exc:
        _count_error(metrics, ex, exc)  # (an UpstreamStatus here is the worker's own in-band error event)
        raise
    rec.streamed = False
    record_tokens(rec, st, ex.decision)
    ex.resp = None
    await _send_json(data, ex, rec, send)
    await finish(resp)


async def answer_unary(ex: Exchange, rec: RequestRecord, send: Any, *, metrics: GatewayMetrics,
                       read_timeout: float) -> None:
    resp = ex.resp
    assert resp is not None
    try:
        data = await resp.read(read_timeout)
    except UpstreamError as exc:
        _count_error(metrics, ex, exc)
        raise
    ex.resp = None
    resp.release()
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        err = UpstreamProtocolError("worker answered with invalid JSON")
        _count_error(metrics, ex, err)
        raise err from None
    rec.prompt_tokens, rec.completion_tokens = usage_counts(doc.get("usage") if isinstance(doc, dict) else None)
    await _send_json(data, ex, rec, send)


async def _send_json(data: bytes, ex: Exchange, rec: RequestRecord, send: Any) -> None:
    ex.started = ex.done = True
    rec.status = 200
    client = ex.client
    if client is not None and client.can_start():
        client.respond(200, [(b"content-type", b"application/json"), *ex.headers], data)
        return
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *ex.headers]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def finish(resp: UpstreamResponse) -> None:
    """After [DONE] the worker still owes the chunked-encoding terminator; wait for it briefly so the connection
    can be reused (the client already has its whole answer)."""
    try:
        while await resp.next_chunk(1.0) is not None:
            pass
    except GatewayError:
        resp.abort()
        return
    resp.release()
