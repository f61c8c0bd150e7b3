"""Calls the gateway makes to a worker on its own behalf: its prompt count (/tokenize) and the explicit abort."""

from __future__ import annotations

import asyncio

import orjson

from app.upstream import UpstreamPool
from app.worker_calls import WorkerCalls, _as_chat_error
from app.workers.registry import Worker


async def _abort_against_a_late_body() -> tuple[bool, bool]:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                      if line.lower().startswith(b"content-length")))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")  # 7 bytes short, for good
        await writer.drain()
        if await reader.read() == b"":  # the gateway hung up
            closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    worker = Worker(name="w", url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    pool = UpstreamPool()
    WorkerCalls(pool, timeout=1.0).abort(worker, "chat", "r1")
    try:
        await asyncio.wait_for(closed.wait(), 5)  # the abort's read gives up after 2 s
    except TimeoutError:
        pass
    hung_up = closed.is_set()
    await pool.close()
    server.close()
    await server.wait_closed()
    return hung_up, worker.explicit_abort


def test_an_abort_whose_answer_never_ends_does_not_keep_its_connection() -> None:
    hung_up, explicit = asyncio.run(_abort_against_a_late_body())
    assert hung_up  # one socket per abort had been left open
    assert explicit


def test_a_count_error_not_worded_as_vllms_validation_passes_through_as_it_came() -> None:
    for body in (b"not json", b'{"error": "flat"}', b'{"error": {"message": 3}}',
                 b'{"error": {"message": "1 validation error:\\n  {\'loc\': \'body.prompt\'}"}}'):
        assert _as_chat_error(body) == body  # (the last: nothing would be left once the prompt's error goes)
    two = b'{"error": {"message": "2 validation errors:\\n  {\'loc\': \'body.prompt\'}\\n  {\'loc\': \'body.x\'}"}}'
    assert orjson.loads(_as_chat_error(two))["error"] == {
        "message": "1 validation error:\n  {'loc': 'body.x'}", "param": "body.x"}
