"""The relay: relay() over the ASGI send, splice()/open_splice() in the worker connection's callbacks (with and
without a RelayBatch), collect(). A stream ends with the worker's [DONE] or an in-band error, never cut short
silently."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, cast

import orjson
import pytest

from app.errors import GatewayError, UpstreamStatus, UpstreamTimeout, status_of
from app.sse import SSEParser
from app.streaming import RelayBatch, Splice, collect, open_splice, relay
from app.upstream import UpstreamClosed, UpstreamProtocolError, UpstreamResponse

from .sse_samples import DONE, ROLE, STREAM, TOK, USAGE

# --- the relay itself: relay() (over ASGI send) and open_splice() (callbacks, straight to the client) ---------------


class FakeResponse:
    """A worker response fed from a script: body pieces, then the end, an exception, or silence (``stall``).
    Serves both reading styles: ``next_chunk`` (relay) and ``attach`` (open_splice, one piece per loop turn)."""

    def __init__(self, pieces: list[bytes], *, then: BaseException | None = None, stall: bool = False) -> None:
        self.pieces = list(pieces)
        self.then = then
        self.stall = stall
        self.sink: object | None = None
        self.paused = False
        self.pause_calls = self.resume_calls = 0

    async def next_chunk(self, timeout: float) -> bytes | None:
        if self.pieces:
            return self.pieces.pop(0)
        if self.then is not None:
            raise self.then
        if self.stall:
            await asyncio.sleep(timeout)
            raise UpstreamTimeout(f"worker sent no more of the response within {timeout:g} s")
        return None

    def attach(self, sink: object) -> None:
        self.sink = sink
        asyncio.get_running_loop().call_soon(self._pump)

    def detach(self) -> None:
        self.sink = None

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.resume_calls += 1
        if self.sink is not None:
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        sink: Any = self.sink
        if sink is None or self.paused:
            return
        if self.pieces:
            sink.on_data(self.pieces.pop(0))
            asyncio.get_running_loop().call_soon(self._pump)
        elif self.then is not None:
            sink.on_error(self.then)
        elif not self.stall:
            sink.on_end()


class FakeClient:
    """A ClientWriter that records what reached the client, and can stop taking writes until ``unblock()``."""

    def __init__(self, *, block_after: int | None = None) -> None:
        self.head: list[tuple[bytes, bytes]] | None = None
        self.body = b""
        self.writes = 0
        self.ended = False
        self.block_after = block_after
        self._writable = asyncio.Event()
        self._writable.set()

    def can_start(self) -> bool:
        return self.head is None

    def start(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, end: bool) -> None:
        assert self.head is None and status == 200
        self.head = headers
        self._take(body)
        self.ended = end

    def write(self, data: bytes) -> None:
        assert self.head is not None and not self.ended
        self._take(data)

    def end(self, data: bytes) -> None:
        assert self.head is not None and not self.ended
        self._take(data)
        self.ended = True

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        raise AssertionError("not for streams")

    def _take(self, data: bytes) -> None:
        self.body += data
        self.writes += 1
        if self.block_after is not None and self.writes >= self.block_after:
            self._writable.clear()

    @property
    def write_paused(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        await self._writable.wait()

    def unblock(self) -> None:
        self.block_after = None
        self._writable.set()

    def watch(self, on_lost: Callable[[], None]) -> bool:
        raise AssertionError("the proxy's business")


async def run_relay(style: str, resp: FakeResponse, *, include_usage: bool = False, idle: float = 5.0,
                    client: FakeClient | None = None) -> tuple[bytes, bool, GatewayError | None, SSEParser]:
    """Relay ``resp`` in one style; returns (bytes the client got, whether the response ended, error, parser)."""
    parser = SSEParser(include_usage)
    first = resp.pieces.pop(0) if resp.pieces else b""
    if style == "relay":
        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        err = await relay(cast(UpstreamResponse, resp), first, parser, send, idle_timeout=idle)
        body = b"".join(m["body"] for m in messages)
        return body, not messages[-1]["more_body"], err, parser
    client = client or FakeClient()
    if first:  # taken on before the first byte ("open"): everything arrives through the callbacks
        resp.pieces.insert(0, first)
    batch = RelayBatch(asyncio.get_running_loop()) if style == "batched" else None
    sp = await open_splice(cast(UpstreamResponse, resp), parser, client, [(b"x-test", b"1")], first_timeout=idle,
                           idle_timeout=idle, on_stall=lambda since: None, batch=batch)
    await sp.rest()
    assert sp.queued == 0
    err = sp.error
    assert client.head == [(b"x-test", b"1")]
    return client.body, client.ended, err, parser


STYLES = ["relay", "open", "batched"]


def in_loop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return run


@pytest.mark.parametrize("style", STYLES)
@in_loop
async def test_a_whole_stream_is_relayed_with_the_unasked_usage_removed(style: str) -> None:
    body, ended, err, parser = await run_relay(style, FakeResponse([STREAM]))
    assert (body, ended, err) == (ROLE + b"".join(TOK) + DONE, True, None)
    assert parser.state.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


@in_loop
async def test_splice_writes_a_complete_short_answer_in_one_write() -> None:
    client = FakeClient()
    await run_relay("open", FakeResponse([STREAM]), include_usage=True, client=client)
    assert client.writes == 1 and client.body == STREAM and client.ended


@pytest.mark.parametrize("style", STYLES)
@in_loop
async def test_events_split_across_worker_reads_reach_the_client_whole(style: str) -> None:
    pieces = [STREAM[i:i + 7] for i in range(0, len(STREAM), 7)]
    body, ended, err, parser = await run_relay(style, FakeResponse(pieces), include_usage=True)
    assert (body, ended, err) == (STREAM, True, None)
    assert parser.state.content_events == 3


@pytest.mark.parametrize("style", STYLES)
@in_loop
async def test_a_worker_that_dies_mid_stream_ends_it_with_an_in_band_error(style: str) -> None:
    resp = FakeResponse([ROLE, TOK[0]], then=UpstreamClosed("worker closed the connection"))
    body, ended, err, _ = await run_relay(style, resp)
    assert isinstance(err, UpstreamClosed) and ended
    assert body.startswith(ROLE + TOK[0])
    last = orjson.loads(body[len(ROLE + TOK[0]):].removeprefix(b"data: "))
    assert last["error"]["code"] == "worker_disconnected" and DONE not in body


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("split", [False, True])
@in_loop
async def test_the_worker_s_own_error_event_ends_the_stream_without_its_done(style: str, split: bool) -> None:
    # vLLM, when generation fails mid-stream: the error event, then [DONE]
    error = b'data: {"error":{"message":"engine died","type":"InternalServerError","param":null,"code":500}}\n\n'
    pieces = [ROLE, TOK[0], error, DONE] if split else [ROLE, TOK[0] + error + DONE]
    body, ended, err, parser = await run_relay(style, FakeResponse(pieces))
    assert (body, ended) == (ROLE + TOK[0] + error, True)
    assert isinstance(err, UpstreamStatus) and status_of(err) == 500 and err.message == "engine died"
    assert parser.state.saw_error and not parser.state.saw_done


@pytest.mark.parametrize("style", STYLES)
@in_loop
async def test_a_stream_cut_without_done_is_not_passed_off_as_complete(style: str) -> None:
    body, ended, err, _ = await run_relay(style, FakeResponse([ROLE, TOK[0]]))
    assert isinstance(err, UpstreamProtocolError) and err.error_code == "worker_stream_truncated" and ended
    assert b"worker_stream_truncated" in body and DONE not in body


@pytest.mark.parametrize("style", STYLES)
@in_loop
async def test_a_worker_that_goes_silent_is_timed_out_in_band(style: str) -> None:
    body, ended, err, _ = await run_relay(style, FakeResponse([ROLE, TOK[0]], stall=True), idle=0.05)
    assert isinstance(err, UpstreamTimeout) and ended
    assert body.startswith(ROLE + TOK[0]) and b"\"code\":\"worker_timeout\"" in body and DONE not in body


@in_loop
async def test_an_opened_relay_writes_the_first_token_from_the_worker_callback() -> None:
    """No task wake-up between the worker's first bytes and the client: they are written inside ``on_data``."""
    client = FakeClient()
    resp = FakeResponse([], stall=True)
    parser = SSEParser(False)
    task = asyncio.get_running_loop().create_task(open_splice(
        cast(UpstreamResponse, resp), parser, client, [(b"x-test", b"1")], first_timeout=5, idle_timeout=5,
        on_stall=lambda since: None))
    await asyncio.sleep(0)
    sink: Any = resp.sink
    assert sink is not None and client.head is None
    sink.on_data(ROLE + TOK[0])
    assert client.head == [(b"x-test", b"1")] and client.body == ROLE + TOK[0]  # before the task ran again
    assert parser.state.first_token is not None
    sp = await asyncio.wait_for(task, 2)
    sink.on_data(TOK[1] + TOK[2] + DONE)
    await sp.rest()
    assert sp.error is None and client.ended and client.body == ROLE + b"".join(TOK) + DONE


async def _opened(client: FakeClient, batch: RelayBatch) -> tuple[asyncio.Task[Splice], Any]:
    """A splice being taken on before the worker's first byte; the test feeds its reads by hand (``sink``)."""
    resp = FakeResponse([], stall=True)
    task = asyncio.get_running_loop().create_task(open_splice(
        cast(UpstreamResponse, resp), SSEParser(False), client, [], first_timeout=5, idle_timeout=5,
        on_stall=lambda since: None, batch=batch))
    await asyncio.sleep(0)
    return task, resp.sink


async def _running(client: FakeClient, batch: RelayBatch) -> tuple[Splice, Any]:
    """A splice past its first token."""
    task, sink = await _opened(client, batch)
    sink.on_data(ROLE + TOK[0])
    return await asyncio.wait_for(task, 2), sink


@in_loop
async def test_later_tokens_wait_for_the_end_of_the_loop_pass_and_first_tokens_do_not() -> None:
    """What one loop pass reads: a stream's first token is written on the spot, a running stream's later tokens
    once the pass is over — a first token never waits behind other streams' relays."""
    batch = RelayBatch(asyncio.get_running_loop())
    running, fresh = FakeClient(), FakeClient()
    sp, running_sink = await _running(running, batch)
    _, fresh_sink = await _opened(fresh, batch)
    assert running.body == ROLE + TOK[0]  # its own first token went out on the spot
    running_sink.on_data(TOK[1])  # the same pass: a later token of the running stream...
    fresh_sink.on_data(ROLE)  # ...and a stream's first bytes: the role, then its first token
    fresh_sink.on_data(TOK[0])
    assert fresh.body == ROLE + TOK[0] and running.body == ROLE + TOK[0] and sp.queued == 1
    await asyncio.sleep(0)  # the end of the pass
    assert running.body == ROLE + TOK[0] + TOK[1] and sp.queued == 0
    fresh_sink.on_data(TOK[1])  # past its first token, this stream's reads wait too
    assert fresh.body == ROLE + TOK[0]
    await asyncio.sleep(0)
    assert fresh.body == ROLE + TOK[0] + TOK[1]


@pytest.mark.parametrize("ending", ["done", "end", "error"])
@in_loop
async def test_a_stream_ends_after_its_reads_that_wait_in_the_batch(ending: str) -> None:
    batch = RelayBatch(asyncio.get_running_loop())
    client = FakeClient()
    sp, sink = await _running(client, batch)
    sink.on_data(TOK[1])
    if ending == "done":
        sink.on_data(TOK[2] + DONE)
    elif ending == "end":
        sink.on_end()  # the connection ended without [DONE], in the same pass: still after TOK[1]
    else:
        sink.on_error(UpstreamClosed("worker closed the connection"))
    assert not client.ended and client.body == ROLE + TOK[0] and not sp.finished
    await asyncio.wait_for(sp.rest(), 2)
    assert client.ended and client.body.startswith(ROLE + TOK[0] + TOK[1]) and sp.queued == 0
    if ending == "done":
        assert sp.error is None and client.body == ROLE + b"".join(TOK) + DONE
    else:
        code = "worker_stream_truncated" if ending == "end" else "worker_disconnected"
        assert sp.error is not None and sp.error.error_code == code
        assert orjson.loads(client.body[len(ROLE + TOK[0] + TOK[1]):].removeprefix(b"data: "))["error"]["code"] == code


@in_loop
async def test_reads_waiting_in_the_batch_are_not_an_idle_worker() -> None:
    batch = RelayBatch(asyncio.get_running_loop())
    client = FakeClient()
    sp, sink = await _running(client, batch)
    sp.last_read -= 3600  # as if the idle timeout had passed since the last read taken...
    sink.on_data(TOK[1])  # ...but a read came in and waits for the end of the pass
    sp._check_idle()
    assert not sp.finished
    await asyncio.sleep(0)
    assert client.body == ROLE + TOK[0] + TOK[1] and not client.ended


@in_loop
async def test_a_read_that_fails_in_the_batch_ends_only_its_own_stream() -> None:
    """One stream's failure while the batch is relayed (here its client's socket breaking) is reported and ends
    that stream; the other streams' reads of the same pass are still relayed, in order."""
    loop = asyncio.get_running_loop()
    reported: list[BaseException | None] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx.get("exception")))

    class Breaking(FakeClient):
        def write(self, data: bytes) -> None:
            raise RuntimeError("the handler is closed")

    batch = RelayBatch(loop)
    broken, fine = Breaking(), FakeClient()
    a, a_sink = await _running(broken, batch)
    b, b_sink = await _running(fine, batch)
    a_sink.on_data(TOK[1])  # one pass: A's read first, then B's read and B's end
    b_sink.on_data(TOK[1] + TOK[2] + DONE)
    await asyncio.sleep(0)
    assert [type(e) for e in reported] == [RuntimeError]
    assert a.finished and a.error is not None and a.error.error_code == "internal_error" and a.queued == 0
    await asyncio.wait_for(b.rest(), 2)
    assert b.error is None and fine.ended and fine.body == ROLE + b"".join(TOK) + DONE and b.queued == 0


@in_loop
async def test_a_relay_stopped_while_its_reads_wait_drops_them() -> None:
    batch = RelayBatch(asyncio.get_running_loop())
    client = FakeClient()
    sp, sink = await _running(client, batch)
    task = asyncio.get_running_loop().create_task(sp.rest())
    await asyncio.sleep(0)
    task.cancel()  # the client went away: the exchange's task is cancelled (it stops the relay)...
    sink.on_data(TOK[1])  # ...in the pass that also read a token for it
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert sp.finished and sp.queued == 0
    assert client.body == ROLE + TOK[0]  # nothing written for a stream that was stopped


@in_loop
async def test_once_the_worker_has_sent_bytes_a_failure_is_never_unsent() -> None:
    """Even when writing the first bytes to the client blew up half-way (the head may be out), what follows is no
    longer 'nothing sent': it must not be retried on another worker."""

    class Breaking(FakeClient):
        def start(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, end: bool) -> None:
            super().start(status, headers, body, end)
            raise RuntimeError("the handler is closed")

    resp = FakeResponse([], stall=True)
    task = asyncio.get_running_loop().create_task(open_splice(
        cast(UpstreamResponse, resp), SSEParser(False), Breaking(), [], first_timeout=5, idle_timeout=5,
        on_stall=lambda since: None))
    await asyncio.sleep(0)
    sink: Any = resp.sink
    with pytest.raises(RuntimeError):
        sink.on_data(ROLE)
    sink.on_error(UpstreamClosed("worker closed the connection"))  # the connection's own handling of that
    sp = await asyncio.wait_for(task, 2)  # not raised as retryable
    assert isinstance(sp.error, UpstreamClosed)


@in_loop
async def test_a_connection_failing_before_the_first_byte_is_raised_with_nothing_sent() -> None:
    client = FakeClient()
    resp = FakeResponse([], then=UpstreamClosed("worker closed the connection"))
    with pytest.raises(UpstreamClosed):
        await open_splice(cast(UpstreamResponse, resp), SSEParser(False), client, [], first_timeout=5,
                          idle_timeout=5, on_stall=lambda since: None)
    assert client.head is None and client.writes == 0 and resp.sink is None  # the caller may try another worker


@in_loop
async def test_a_worker_silent_before_its_first_byte_times_out_with_nothing_sent() -> None:
    client = FakeClient()
    resp = FakeResponse([], stall=True)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(UpstreamTimeout):
        await open_splice(cast(UpstreamResponse, resp), SSEParser(False), client, [], first_timeout=0.05,
                          idle_timeout=5, on_stall=lambda since: None)
    assert asyncio.get_running_loop().time() - t0 < 1  # the time to first byte, not the idle timeout
    assert client.head is None and resp.sink is None


@in_loop
async def test_an_opened_relay_switches_to_the_idle_timeout_after_the_first_bytes() -> None:
    client = FakeClient()
    resp = FakeResponse([ROLE], stall=True)
    sp = await open_splice(cast(UpstreamResponse, resp), SSEParser(False), client, [], first_timeout=60,
                           idle_timeout=0.05, on_stall=lambda since: None)
    await asyncio.wait_for(sp.rest(), 2)
    assert isinstance(sp.error, UpstreamTimeout) and client.ended and client.body.startswith(ROLE)


@in_loop
async def test_an_empty_answer_with_status_200_is_a_truncated_stream_in_band() -> None:
    client = FakeClient()
    sp = await open_splice(cast(UpstreamResponse, FakeResponse([])), SSEParser(False), client, [], first_timeout=5,
                           idle_timeout=5, on_stall=lambda since: None)
    await sp.rest()
    assert isinstance(sp.error, UpstreamProtocolError) and sp.error.error_code == "worker_stream_truncated"
    assert client.ended and b"worker_stream_truncated" in client.body


@in_loop
async def test_splice_pauses_the_worker_while_the_client_is_not_reading() -> None:
    client = FakeClient(block_after=2)
    resp = FakeResponse([ROLE, TOK[0], TOK[1], TOK[2], USAGE + DONE])
    stalls: list[float] = []
    sp = await open_splice(cast(UpstreamResponse, resp), SSEParser(False), client, [], first_timeout=5,
                           idle_timeout=0.05, on_stall=stalls.append)
    task = asyncio.get_running_loop().create_task(sp.rest())
    await asyncio.sleep(0.2)  # longer than the idle timeout: a paused worker is not a silent one
    assert not task.done() and resp.paused and client.writes == 2 and stalls[-1] > 0
    client.unblock()
    await task
    assert sp.error is None
    assert client.body == ROLE + b"".join(TOK) + DONE and client.ended
    assert resp.pause_calls == 1 and resp.resume_calls >= 1 and stalls[-1] == 0.0


@in_loop
async def test_collect_reads_a_whole_stream_split_across_reads_into_the_sink() -> None:
    seen: list[dict[str, Any]] = []
    parser = SSEParser(include_usage=True, sink=seen.append)
    pieces = [STREAM[i:i + 11] for i in range(0, len(STREAM), 11)]
    resp = FakeResponse(pieces[1:])
    await collect(cast(UpstreamResponse, resp), pieces[0], parser, idle_timeout=5.0)
    assert len(seen) == 5 and parser.state.saw_done and parser.state.content_events == 3
    assert resp.sink is None  # let go of the connection once [DONE] was seen


@pytest.mark.parametrize(("resp", "error", "code"), [
    (FakeResponse([TOK[0]], then=UpstreamClosed("gone")), UpstreamClosed, "worker_disconnected"),
    (FakeResponse([TOK[0]]), UpstreamProtocolError, "worker_stream_truncated"),
    (FakeResponse([TOK[0]], stall=True), UpstreamTimeout, "worker_timeout"),
    (FakeResponse([TOK[0], b"data: {not json\n\n"]), UpstreamProtocolError, "bad_worker_response"),
])
@in_loop
async def test_collect_raises_what_cut_the_stream_short(resp: FakeResponse, error: type[Exception], code: str
                                                         ) -> None:
    with pytest.raises(error) as caught:
        await collect(cast(UpstreamResponse, resp), ROLE, SSEParser(True, sink=lambda obj: None), idle_timeout=0.05)
    assert isinstance(caught.value, GatewayError) and caught.value.error_code == code
