"""app/workerconn.py: one connection's parsing, keep-alive and failures, fed bytes directly (no socket)."""

from __future__ import annotations

import asyncio

import pytest

from app.workerconn import Origin, UpstreamClosed, UpstreamProtocolError, WorkerConnection


class _Transport:
    """Enough of a transport for the connection: what it wrote, whether it was paused or closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class _Pool:
    def __init__(self) -> None:
        self.forgotten: list[WorkerConnection] = []

    def forget(self, conn: WorkerConnection) -> None:
        self.forgotten.append(conn)

    def put(self, conn: WorkerConnection) -> None:  # pragma: no cover - not used here
        pass


def _conn(sent: bool = True) -> tuple[WorkerConnection, _Transport, _Pool]:
    """A connection; with ``sent``, a request has gone out on it (what the worker sends answers it)."""
    pool, transport = _Pool(), _Transport()
    conn = WorkerConnection(Origin.parse("http://127.0.0.1:8001"), pool)
    conn.connection_made(transport)  # type: ignore[arg-type]
    if sent:
        conn.send(b"GET / HTTP/1.1\r\n\r\n", b"")
    return conn, transport, pool


def test_origin_parsing() -> None:
    assert Origin.parse("http://w:8000/v1") == Origin("http", "w", 8000)
    assert Origin.parse("https://w").port == 443 and Origin.parse("https://w").host_header == b"w"
    assert Origin.parse("http://w:8000").host_header == b"w:8000"
    with pytest.raises(ValueError):
        Origin.parse("ftp://w")


def test_a_response_is_read_and_leaves_the_connection_reusable() -> None:
    async def go() -> None:
        conn, transport, _ = _conn(sent=False)
        conn.send(b"POST / HTTP/1.1\r\n\r\n", b"{}")
        assert transport.written == [b"POST / HTTP/1.1\r\n\r\n{}"]
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 6\r\n\r\nda")
        await conn.wait_headers(1.0)
        assert conn.status == 200 and (b"content-type", b"text/event-stream") in conn.headers
        assert await conn.next_chunk(1.0) == b"da"
        conn.data_received(b"ta: ")
        assert await conn.next_chunk(1.0) == b"ta: " and conn.complete
        assert await conn.next_chunk(1.0) is None
        assert conn.reusable()
        conn.reset()
        assert not conn.complete and conn.status == 0

    asyncio.run(go())


def test_malformed_http_and_an_early_close_are_mapped_to_upstream_errors() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        conn.data_received(b"NOT HTTP AT ALL\r\n\r\n")
        with pytest.raises(UpstreamProtocolError):
            await conn.wait_headers(1.0)
        assert transport.closed and not conn.reusable()

        conn, transport, pool = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await conn.wait_headers(1.0)
        conn.connection_lost(None)
        assert pool.forgotten == [conn] and conn.closed
        assert await conn.next_chunk(1.0) == b"abc"  # what arrived is still handed over, then the failure
        with pytest.raises(UpstreamClosed):
            await conn.next_chunk(1.0)

    asyncio.run(go())


def test_a_reader_that_falls_behind_pauses_the_socket() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await conn.wait_headers(1.0)
        chunk = b"x" * 65536
        for _ in range(5):  # 320 KiB unread: past the high-water mark
            conn.data_received(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        assert transport.paused
        assert len(await conn.next_chunk(1.0) or b"") == 5 * 65536
        assert not transport.paused

    asyncio.run(go())


def test_a_second_response_to_one_request_closes_the_connection() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await conn.wait_headers(1.0)
        assert await conn.next_chunk(1.0) == b"ok"  # the answer itself is whole
        assert await conn.next_chunk(1.0) is None
        assert transport.closed and not conn.reusable()  # what followed can't be taken for the next answer

    asyncio.run(go())


def test_bytes_while_idle_close_the_connection() -> None:
    conn, transport, _ = _conn()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert conn.reusable()
    conn.reset()  # back in the pool (UpstreamPool.put)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEXTRA")
    assert transport.closed and not conn.reusable()


def test_response_headers_are_bounded() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        for i in range(100):
            conn.data_received(b"x-filler-%d: %b\r\n" % (i, b"y" * 1000))
            if transport.closed:
                break
        assert transport.closed and i < 70  # stopped at 64 KiB, not buffered for as long as the worker goes on
        with pytest.raises(UpstreamProtocolError, match="headers over 64 KiB"):
            await conn.wait_headers(1.0)

    asyncio.run(go())


def test_a_response_without_length_or_chunks_ends_with_the_connection() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":")
        await conn.wait_headers(1.0)
        conn.data_received(b"1}")
        conn.connection_lost(None)
        assert await conn.next_chunk(1.0) == b'{"a":1}'
        assert await conn.next_chunk(1.0) is None  # the end, not UpstreamClosed
        assert not conn.reusable()

    asyncio.run(go())


def test_interim_1xx_responses_are_skipped_and_the_final_one_is_read() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
        # RFC 9110 15.2: a client must accept 1xx responses before the final one (a proxy in front of a worker
        # may send 103 Early Hints or an unsolicited 100 Continue), in one read or split
        conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 2\r\n\r\nok")
        await conn.wait_headers(1.0)
        assert conn.status == 200 and conn.headers == [(b"content-type", b"text/event-stream"),
                                                       (b"content-length", b"2")]
        assert await conn.next_chunk(1.0) == b"ok"
        assert await conn.next_chunk(1.0) is None
        assert conn.complete and conn.reusable() and not transport.closed

    asyncio.run(go())
