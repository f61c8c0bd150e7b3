"""SSE relay: forward worker bytes as they arrive, cut at event boundaries (``sse.SSEParser``), and end every
stream either with the worker's ``[DONE]`` or with an in-band error event — never cut short silently. The worker's
own error event ends a stream as failed: vLLM follows it with ``[DONE]``, which is not passed on.

Two ways to relay: ``relay`` over the ASGI ``send``, and ``open_splice`` in the worker connection's own callbacks,
writing straight to the client's (``ClientWriter``); ``collect`` reads a whole stream for a
non-streaming answer the same way. The relay never re-serialises a chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import monotonic, perf_counter
from typing import Any

from .clientwriter import ClientWriter
from .errors import GatewayError, UpstreamError, UpstreamTimeout, in_band_error, sse_event
from .sse import SSEParser
from .upstream import UpstreamProtocolError, UpstreamResponse

Send = Callable[[dict[str, Any]], Awaitable[None]]
log = logging.getLogger("tokengate.streaming")


def _truncated() -> UpstreamProtocolError:
    return UpstreamProtocolError("worker ended the stream without [DONE]", code="worker_stream_truncated")


async def relay(resp: UpstreamResponse, first: bytes, parser: SSEParser, send: Send, *, idle_timeout: float
                ) -> GatewayError | None:
    """Relay the rest of a stream whose response has started. Returns the error that ended it early, if any
    (already sent in-band; the caller aborts the upstream)."""
    st = parser.state
    chunk: bytes | None = first
    while chunk is not None:
        t0 = perf_counter()
        try:
            out = parser.feed(chunk, t0)
        except GatewayError as exc:
            await send({"type": "http.response.body", "body": sse_event(exc), "more_body": False})
            return exc
        if st.saw_error:
            await send({"type": "http.response.body", "body": out, "more_body": False})
            st.relayed(perf_counter() - t0)
            return in_band_error(st.error)
        if st.saw_done:
            await send({"type": "http.response.body", "body": out, "more_body": False})
            st.relayed(perf_counter() - t0)
            return None
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
            st.relayed(perf_counter() - t0)
        try:
            chunk = await resp.next_chunk(idle_timeout)
        except GatewayError as exc:
            await send({"type": "http.response.body", "body": sse_event(exc), "more_body": False})
            return exc
    truncated = _truncated()
    await send({"type": "http.response.body", "body": sse_event(truncated), "more_body": False})
    return truncated


class RelayBatch:
    """Reads of running streams that wait for the end of the loop pass (one per event loop: ``Dispatcher``).

    One loop pass runs the callbacks of every socket that became readable, one after the other; at a few hundred
    streams that is a few milliseconds of relaying. A read that brings a stream's first token, and a new request,
    are what a user waits for; later tokens are only as late as the pass is long either way. So a stream's reads
    after its first token are put here and relayed together once the pass's reads are taken, in the order they
    came (its end and its failure, too, after its reads); the rest of the pass goes first."""

    __slots__ = ("loop", "_items")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[_Reader, bytes | BaseException | None, float]] = []

    def add(self, reader: _Reader, item: bytes | BaseException | None) -> None:
        """A read (bytes), the end (None) or a failure of ``reader``'s stream."""
        items = self._items
        if not items:
            self.loop.call_soon(self._flush)
        items.append((reader, item, perf_counter()))
        reader.queued += 1

    def _flush(self) -> None:
        items, self._items = self._items, []
        for reader, item, t0 in items:
            reader.queued -= 1
            try:
                if isinstance(item, bytes):
                    reader.take(item, t0)
                elif item is None:
                    reader.take_end()
                else:
                    reader.take_error(item)
            except Exception as exc:  # one stream's failure (a bug, a broken client socket) ends that stream only
                self.loop.call_exception_handler({"message": "relaying a worker read failed", "exception": exc})
                reader.fail()


class _Reader:
    """A worker stream read in callbacks: the connection hands each read to ``on_data`` from its own
    ``data_received`` — no task wake-up, future or timer per chunk. The task that owns the exchange sleeps in
    ``run`` until the stream has ended (``finished``, with ``error`` when it ended badly). One idle timer per
    stream, re-armed lazily."""

    __slots__ = ("parser", "resp", "loop", "idle_timeout", "waiter", "last_read", "paused", "finished", "error",
                 "timer", "early", "unsent", "batch", "queued")

    def __init__(self, parser: SSEParser, resp: UpstreamResponse, idle_timeout: float,
                 loop: asyncio.AbstractEventLoop, batch: RelayBatch | None = None) -> None:
        self.batch = batch  # where reads after the first token wait for the end of the loop pass (None: never)
        self.queued = 0  # of this stream's reads (and its end) waiting there
        self.parser = parser
        self.resp = resp
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.waiter: asyncio.Future[None] | None = None
        self.last_read = loop.time()
        self.paused = False
        self.finished = False
        self.error: GatewayError | None = None
        self.timer: asyncio.TimerHandle | None = None  # armed once the first read did not end the stream
        self.early = False  # attached before the first body byte (``open``), and none has come yet
        self.unsent: GatewayError | None = None  # the connection failed before its first byte: nothing passed on

    # Sink
    def on_data(self, data: bytes) -> None:
        if self.finished:
            return
        batch = self.batch
        if batch is not None and (self.queued or self.parser.state.first_token is not None):
            batch.add(self, data)  # a later token: relayed at the end of this loop pass
            return
        self.take(data, perf_counter())

    def on_end(self) -> None:
        if self.queued:
            assert self.batch is not None
            self.batch.add(self, None)  # after the reads still waiting
            return
        self.take_end()

    def on_error(self, exc: BaseException) -> None:
        if self.queued:
            assert self.batch is not None
            self.batch.add(self, exc)
            return
        self.take_error(exc)

    def take(self, data: bytes, t0: float) -> None:
        """One read of the body, which arrived at ``t0``."""
        if self.finished:
            return
        first = self.early
        self.early = False  # the worker has answered: whatever fails from here on goes to the client in-band
        try:
            out = self.parser.feed(data, t0)
        except GatewayError as exc:
            self._finish(exc, sse_event(exc))
            return
        except Exception:  # a bug of ours, raised inside the worker connection's callback: end this stream in-band
            log.exception("reading a worker's stream")
            internal = GatewayError("internal error in the gateway")
            self._finish(internal, sse_event(internal))
            return
        st = self.parser.state
        if st.saw_done or st.saw_error:
            self._finish(in_band_error(st.error) if st.saw_error else None, out, t0)
            return
        self.last_read = self.loop.time()
        if out:
            self._forward(out, t0)
        if first and not self.finished:  # from now on the stream's idle timeout applies
            self._begin()
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(self.last_read + self.idle_timeout, self._check_idle)
            self._wake()

    def take_end(self) -> None:
        if self.finished:
            return
        truncated = _truncated()
        self._finish(truncated, sse_event(truncated))

    def take_error(self, exc: BaseException) -> None:
        if self.finished:
            return
        err = exc if isinstance(exc, GatewayError) else UpstreamError(f"worker connection failed: {exc}")
        if self.early:
            self._fail_unsent(err)
            return
        self._finish(err, sse_event(err))

    def fail(self) -> None:
        """Handling a read raised what no stream should (not the worker's fault): end the stream with an
        internal error, in-band where the client can still take it, and let its task go on."""
        if self.finished:
            return
        err = GatewayError("internal error in the gateway")
        try:
            self._finish(err, sse_event(err))  # stops and wakes first, then writes
        except Exception:
            if not self.finished:
                self.error = err
                self._stop()
                self._wake()

    # what the two kinds do with events
    def _forward(self, out: bytes, t0: float) -> None:
        """Complete events to pass on (not the last)."""

    def _finish(self, error: GatewayError | None, final: bytes, t0: float | None = None) -> None:
        """The stream has ended: ``final`` is what is left to pass on (the last events, or an error event; with
        ``t0``, the worker's own last events, read at ``t0``)."""
        self.error = error
        self._stop()
        self._wake()

    # internals
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail_unsent(self, err: GatewayError) -> None:
        """Before the first body byte: nothing has gone to the client, so the caller may still try another
        worker (or answer with an error status)."""
        self.unsent = err
        self._stop()
        self._wake()

    def _stop(self) -> None:
        """No more reading: the timer off, the connection's callbacks no longer ours."""
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self.resp.detach()

    def _check_first(self, timeout: float) -> None:
        if self.early and not self.finished:
            self._fail_unsent(UpstreamTimeout(f"worker sent no more of the response within {timeout:g} s"))

    def _check_idle(self) -> None:
        if self.finished:
            return
        now = self.loop.time()
        due = self.last_read + self.idle_timeout
        if not self.paused and not self.queued and now >= due:
            err = UpstreamTimeout(f"worker sent no more of the response within {self.idle_timeout:g} s")
            self._finish(err, sse_event(err))
            return
        # idle while the client was not reading, or while reads waited in the batch, is not the worker's fault
        self.timer = self.loop.call_at(now + self.idle_timeout if self.paused or self.queued else due,
                                       self._check_idle)

    def _begin(self) -> None:
        """After the first chunk, before the rest is read."""

    async def _unpause(self) -> None:
        raise AssertionError("only a relay to a client pauses")

    async def run(self, first: bytes) -> None:
        """Take the stream from its first body bytes (read by the caller) to its end."""
        if first:
            self.on_data(first)
        if not self.finished:
            self._begin()
            self.timer = self.loop.call_at(self.last_read + self.idle_timeout, self._check_idle)
            self.resp.attach(self)  # what arrived meanwhile is handed over at once, the rest as it comes
        await self.rest()

    async def open(self, timeout: float) -> None:
        """Take the stream before its first body byte: attached at once, the first read is handled in the
        connection's own callback (a relay writes it to the client there: no task wake-up between the worker's
        first token and the client). Returns once the first bytes were handled (``rest()`` takes it on from
        there), or the stream is over; raises ``unsent`` — the connection failed, or sent nothing within
        ``timeout`` — with nothing passed on, so the caller may still try another worker."""
        self.early = True
        self.last_read = self.loop.time()
        self.timer = self.loop.call_at(self.last_read + timeout, self._check_first, timeout)
        self.resp.attach(self)
        try:
            while self.early and not self.finished:
                self.waiter = self.loop.create_future()
                await self.waiter
                self.waiter = None
        except BaseException:  # cancelled (the client went away)
            self.early = False
            self._stop()
            raise
        if self.unsent is not None:
            raise self.unsent

    async def rest(self) -> None:
        """Sleep until the stream has ended (``finished``, with ``error`` when it ended badly)."""
        try:
            while not self.finished:
                if self.paused:
                    await self._unpause()
                    continue
                self.waiter = self.loop.create_future()
                await self.waiter
                self.waiter = None
        finally:
            if not self.finished:  # cancelled (the client went away): the caller aborts the worker request
                self._stop()
            elif self.paused:
                self.resp.resume_reading()  # the rest (the chunked terminator) is read to reuse the connection


class Splice(_Reader):
    """The relay: each read's complete events are written to the client on the spot (the head with the first
    ones). When the client stops taking writes, the worker connection is paused, not buffered, and the task
    waits for the client (the write watchdog times how long)."""

    __slots__ = ("client", "head", "on_stall")

    def __init__(self, parser: SSEParser, client: ClientWriter, resp: UpstreamResponse, idle_timeout: float,
                 loop: asyncio.AbstractEventLoop, head: list[tuple[bytes, bytes]],
                 on_stall: Callable[[float], None], batch: RelayBatch | None = None) -> None:
        super().__init__(parser, resp, idle_timeout, loop, batch)
        self.client = client
        self.head: list[tuple[bytes, bytes]] | None = head  # the response headers, until they have gone out
        self.on_stall = on_stall

    def _forward(self, out: bytes, t0: float) -> None:
        st = self.parser.state
        head = self.head
        if head is not None:
            self.head = None  # gone out, or going: never started twice
            self.client.start(200, head, out, False)
        else:
            self.client.write(out)  # a client that has gone is noticed by its own watcher (it cancels us)
        st.relayed(perf_counter() - t0)
        if self.client.write_paused and not self.paused:
            self.paused = True
            self.resp.pause_reading()
            self._wake()

    def _finish(self, error: GatewayError | None, final: bytes, t0: float | None = None) -> None:
        super()._finish(error, final, t0)
        head = self.head
        if head is not None:
            self.head = None
            self.client.start(200, head, final, True)  # the whole answer in one write
        else:
            self.client.end(final)
        if t0 is not None:
            self.parser.state.relayed(perf_counter() - t0)

    def _begin(self) -> None:
        head = self.head
        if head is not None:  # nothing to show yet (a partial event): the head goes now, alone
            self.head = None
            self.client.start(200, head, b"", False)

    async def _unpause(self) -> None:
        self.on_stall(monotonic())
        await self.client.drain()
        self.on_stall(0.0)
        self.paused = False
        self.last_read = self.loop.time()
        self.resp.resume_reading()


async def open_splice(resp: UpstreamResponse, parser: SSEParser, client: ClientWriter,
                      headers: list[tuple[bytes, bytes]], *, first_timeout: float, idle_timeout: float,
                      on_stall: Callable[[float], None], batch: RelayBatch | None = None) -> Splice:
    """``relay`` with its per-chunk path in callbacks (``Splice``), writing straight to the client (the head with
    the first events), taken on before the worker's first body byte (``_Reader.open``): the first token goes from
    the worker's socket to the client's in one callback. Raises what failed before that byte (nothing sent: the
    caller may try another worker); ``await sp.rest()`` then relays the rest, ``sp.error`` says how it ended."""
    sp = Splice(parser, client, resp, idle_timeout, asyncio.get_running_loop(), headers, on_stall, batch)
    await sp.open(first_timeout)
    return sp


async def collect(resp: UpstreamResponse, first: bytes, parser: SSEParser, *, idle_timeout: float) -> None:
    """Read a whole worker stream into ``parser`` (whose sink builds the answer), in callbacks like a ``Splice``.
    Raises the error that cut it short."""
    reader = _Reader(parser, resp, idle_timeout, asyncio.get_running_loop())
    await reader.run(first)
    if reader.error is not None:
        raise reader.error
