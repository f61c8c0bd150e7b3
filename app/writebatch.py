"""Socket writes gathered over one pass of the event loop and issued together at its end.

On loopback each ``write`` runs the receiver's TCP stack and, when the receiving process sleeps, wakes it on its
CPU (an inter-processor interrupt: a VM exit on a virtual machine). A busy gateway handles many reads in one pass
of its loop and writes after each: to the worker (a request) and to the client (an answer). Written where they
are made, those writes are spread over the pass, and each finds its peer asleep again; issued together right
after the pass, the first wakes the peer and the rest find it awake, and the peer reads them in one pass of its
own. At saturation this took ~12 % of a gateway's CPU per request; a write leaves at the end of the pass, or
sooner once ``MAX_BATCH`` are held (at light load a pass is a few microseconds).

Order is kept: a transport's writes leave in the order they were made, and ``close()`` of a ``BatchedTransport``
sends what it holds first. A write whose transport closed before its turn is dropped (the peer is gone) and, for
a worker request, reported to ``on_fail`` (it was not sent, so it may be retried).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

OnFail = Callable[[BaseException], None]
# Writes held at most: the pass's 16th write issues them all at once, so a burst's first answers leave after at most
# 15 more reads have been handled, not at the end of a pass of hundreds. Same-run A/Bs (bench.ab, c=64): with 8
# against none, saturation 220 vs 245 µs of CPU per request, paced TTFT p99 +3.7 vs +5.0 ms (unbounded: 218 vs 249
# µs, but paced p99 +6.4 vs +3.4 ms); with 16 against 8, saturation 190 vs 195 µs, paced TTFT p50 / p99
# +0.66 / +3.74 vs +1.10 / +6.50 ms.
MAX_BATCH = 16


class WriteBatcher:
    """The writes of one pass, per server or per worker pool (one event loop)."""

    __slots__ = ("_pending", "_scheduled_on", "max_batch")

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self._pending: list[tuple[asyncio.WriteTransport, bytes, OnFail | None]] = []
        # the loop whose pass end will flush (a loop that ended before its pass did, in tests, runs nothing more)
        self._scheduled_on: asyncio.AbstractEventLoop | None = None
        self.max_batch = max_batch

    def write(self, transport: asyncio.WriteTransport, data: bytes, on_fail: OnFail | None = None) -> None:
        pending = self._pending
        pending.append((transport, data, on_fail))
        if len(pending) >= self.max_batch:
            self.flush()
        elif self._scheduled_on is not (loop := asyncio.get_running_loop()):
            self._scheduled_on = loop
            loop.call_soon(self._pass_end)

    def _pass_end(self) -> None:
        self._scheduled_on = None
        self.flush()

    def flush(self) -> None:
        """Issue every write held, in order (also early: before a close)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for transport, data, on_fail in pending:
            try:
                if transport.is_closing():
                    raise ConnectionResetError("the connection closed before the write")
                transport.write(data)
            except (RuntimeError, OSError) as exc:  # uvloop: RuntimeError once the handle is closed
                if on_fail is not None:
                    on_fail(exc)


class BatchedTransport(asyncio.Transport):
    """A client connection's transport whose writes go through a ``WriteBatcher``: every writer (uvicorn's
    ``send``, its error answers, ``ClientLink``) shares the one queue, so their order holds; closing sends the
    queue first. What uvicorn and the gateway call on a transport is passed on; the rest is asyncio's default
    (``writelines`` joins and writes; others are not implemented)."""

    __slots__ = ("_inner", "_batch")

    def __init__(self, inner: asyncio.Transport, batch: WriteBatcher) -> None:
        super().__init__()
        self._inner = inner
        self._batch = batch

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._batch.write(self._inner, bytes(data) if not isinstance(data, bytes) else data)

    def close(self) -> None:
        self._batch.flush()
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()  # what it held for this transport is dropped at the flush (closing)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)
