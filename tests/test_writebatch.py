"""app/writebatch.py: writes held for the end of the loop pass, in order, bounded; closing sends them first."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.cli import build_parser, settings_from_args
from app.settings import Settings
from app.workerconn import Origin, UpstreamClosed, WorkerConnection
from app.writebatch import MAX_BATCH, BatchedTransport, WriteBatcher
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway


class _Transport:
    """Records what reaches the socket, with its order among closes and aborts (``log`` is shared)."""

    def __init__(self, name: str, log: list[tuple[str, str, bytes]]) -> None:
        self.name, self.log = name, log
        self.closing = False

    def write(self, data: bytes) -> None:
        if self.closing:
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.log.append((self.name, "write", data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.log.append((self.name, "close", b""))

    def abort(self) -> None:
        self.closing = True
        self.log.append((self.name, "abort", b""))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


def test_writes_leave_at_the_end_of_the_pass_in_order() -> None:
    log: list[tuple[str, str, bytes]] = []

    async def go() -> list[tuple[str, str, bytes]]:
        batch = WriteBatcher()
        a, b = _Transport("a", log), _Transport("b", log)
        batch.write(a, b"1")  # type: ignore[arg-type]
        batch.write(b, b"2")  # type: ignore[arg-type]
        batch.write(a, b"3")  # type: ignore[arg-type]
        held = list(log)
        await asyncio.sleep(0)  # the pass ends
        return held

    held = asyncio.run(go())
    assert held == []  # nothing went while the pass ran
    assert log == [("a", "write", b"1"), ("b", "write", b"2"), ("a", "write", b"3")]


def test_the_bound_sends_at_once() -> None:
    log: list[tuple[str, str, bytes]] = []

    async def go() -> None:
        batch = WriteBatcher()
        t = _Transport("t", log)
        for i in range(MAX_BATCH - 1):
            batch.write(t, b"%d" % i)  # type: ignore[arg-type]
        assert log == []
        batch.write(t, b"last")  # type: ignore[arg-type]
        assert [d for _, _, d in log] == [b"%d" % i for i in range(MAX_BATCH - 1)] + [b"last"]
        batch.write(t, b"after")  # type: ignore[arg-type]  # held again until the pass ends
        assert len(log) == MAX_BATCH
        await asyncio.sleep(0)
        assert log[-1] == ("t", "write", b"after")

    asyncio.run(go())


def test_a_write_whose_connection_closed_first_is_dropped_and_reported() -> None:
    log: list[tuple[str, str, bytes]] = []
    failed: list[BaseException] = []

    async def go() -> None:
        batch = WriteBatcher()
        gone, alive = _Transport("gone", log), _Transport("alive", log)
        batch.write(gone, b"x", failed.append)  # type: ignore[arg-type]
        batch.write(alive, b"y", failed.append)  # type: ignore[arg-type]
        gone.closing = True  # the peer went away before the pass ended
        await asyncio.sleep(0)

    asyncio.run(go())
    assert log == [("alive", "write", b"y")]
    assert len(failed) == 1 and isinstance(failed[0], ConnectionResetError)


def test_a_new_loop_is_not_left_waiting_for_a_pass_end_of_a_loop_that_is_gone() -> None:
    log: list[tuple[str, str, bytes]] = []
    batch = WriteBatcher()

    async def write_and_leave() -> None:
        batch.write(_Transport("old", log), b"1")  # type: ignore[arg-type]

    asyncio.run(write_and_leave())  # (asyncio.run runs the pass end before closing; a loop stopped mid-pass won't)
    gone = asyncio.new_event_loop()
    gone.close()
    batch._scheduled_on = gone  # as if scheduled on a loop that never runs again

    async def write_again() -> None:
        batch.write(_Transport("new", log), b"2")  # type: ignore[arg-type]
        await asyncio.sleep(0)

    asyncio.run(write_again())
    assert ("new", "write", b"2") in log


def test_batched_transport_close_sends_what_is_held_first_abort_drops_it() -> None:
    log: list[tuple[str, str, bytes]] = []

    async def go() -> None:
        batch = WriteBatcher()
        closed = BatchedTransport(_Transport("c", log), batch)  # type: ignore[arg-type]
        aborted = BatchedTransport(_Transport("a", log), batch)  # type: ignore[arg-type]
        closed.write(b"head")
        closed.writelines([b"bo", b"dy"])
        aborted.write(b"lost")
        aborted.abort()
        closed.close()
        assert closed.is_closing() and closed.get_extra_info("peername") == ("127.0.0.1", 5)
        await asyncio.sleep(0)

    asyncio.run(go())
    assert log == [("a", "abort", b""), ("c", "write", b"head"), ("c", "write", b"body"), ("c", "close", b"")]


class _Pool:
    def forget(self, conn: WorkerConnection) -> None:
        pass

    def put(self, conn: WorkerConnection) -> None:  # pragma: no cover - not used here
        pass


def _batched_conn(log: list[tuple[str, str, bytes]]) -> tuple[WorkerConnection, _Transport]:
    transport = _Transport("w", log)
    conn = WorkerConnection(Origin.parse("http://127.0.0.1:8001"), _Pool(), WriteBatcher())
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_a_batched_request_the_worker_closed_before_it_left_fails_as_unsent() -> None:
    """The pool retries such a request on a fresh connection (upstream.request): it never reached the worker."""
    log: list[tuple[str, str, bytes]] = []

    async def go() -> None:
        conn, transport = _batched_conn(log)
        conn.send(b"POST / HTTP/1.1\r\n\r\n", b"{}")
        transport.closing = True  # the worker's FIN is handled in the same pass, before the write's turn
        with pytest.raises(UpstreamClosed, match="before the request was sent"):
            await conn.wait_headers(5)
        assert not conn.got_bytes

    asyncio.run(go())
    assert [e for e in log if e[1] == "write"] == []


def test_a_large_body_goes_as_two_writes_in_order() -> None:
    log: list[tuple[str, str, bytes]] = []

    async def go() -> None:
        conn, _ = _batched_conn(log)
        body = b"x" * 70000
        conn.send(b"HEAD", body)
        await asyncio.sleep(0)
        assert log == [("w", "write", b"HEAD"), ("w", "write", body)]

    asyncio.run(go())


def test_a_batch_of_one_writes_at_once() -> None:
    log: list[tuple[str, str, bytes]] = []

    async def go() -> None:
        batch = WriteBatcher(1)
        batch.write(_Transport("t", log), b"now")  # type: ignore[arg-type]
        assert log == [("t", "write", b"now")]

    asyncio.run(go())


def test_flag_and_environment() -> None:
    assert settings_from_args(build_parser().parse_args(["serve", "--write-batch", "1"])).write_batch == 1
    assert Settings().write_batch == MAX_BATCH
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENGATE_WRITE_BATCH", "4")
        assert Settings().write_batch == 4
    with pytest.raises(ValueError):
        Settings(write_batch=0)


@pytest.mark.parametrize("write_batch", [1, MAX_BATCH])
def test_gateway_streams_whole_answers_either_way(write_batch: int) -> None:
    """Many streams at once through the batched writes (requests to the worker, answers to the clients): each
    answer complete and in order, and the pool and server use the size given."""
    with ThreadedFakeWorker() as worker, run_gateway(Settings(upstream=[worker.url], discovery_interval=60.0,
                                                              write_batch=write_batch), ready_timeout=20) as gw:
        assert gw.state.proxy.pool.batch.max_batch == write_batch

        async def one(client: httpx.AsyncClient, i: int) -> list[str]:
            body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": f"hi {i}"}]}
            async with client.stream("POST", gw.base + "/chat/completions", json=body) as r:
                assert r.status_code == 200
                return [line async for line in r.aiter_lines() if line.startswith("data: ")]

        async def many() -> list[list[str]]:
            async with httpx.AsyncClient(timeout=20) as client:
                return await asyncio.gather(*(one(client, i) for i in range(40)))

        for events in asyncio.run(many()):
            assert events[-1] == "data: [DONE]"
            tokens = [e for e in events[:-1] if '"content":"' in e and '"content":""' not in e]
            assert len(tokens) == 8, events
