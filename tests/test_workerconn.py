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


def _conn() -> tuple[WorkerConnection, _Transport, _Pool]:
    pool, transport = _Pool(), _Transport()
    conn = WorkerConnection(Origin.parse("http://127.0.0.1:8001"), pool)
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, pool


def test_origin_parsing() -> None:
    assert Origin.parse("http://w:8000/v1") == Origin("http", "w", 8000)
    assert Origin.parse("https://w").port == 443 and Origin.parse("https://w").host_header == b"w"
    assert Origin.parse("http://w:8000").host_header == b"w:8000"
    with pytest.raises(ValueError):
        Origin.parse("ftp://w")


def test_a_response_is_read_and_leaves_the_connection_reusable() -> None:
    async def go() -> None:
        conn, transport, _ = _conn()
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
