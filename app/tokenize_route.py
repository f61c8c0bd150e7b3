"""``POST /tokenize``: vLLM's own prompt count, through the gateway.

vLLM serves ``/tokenize`` (``{"model", "prompt" | "messages", ...}`` → ``{"count", "max_model_len", "tokens"}``);
clients use it to size prompts to a context — ``tokengate bench`` builds its prompts of a requested length with it.
The gateway treats it like a generation up to the worker: the key must be allowed the model and region, its
request and concurrency limits apply (no tokens are charged: nothing is generated), the body passes the same
request policy (tokenize's own fields; no remote media, no template hooks), and a model still starting or a
draining gateway answers 503. It then goes to a ready worker of the model in the request's region — another one
when a worker can't be reached — and the answer is the worker's own body, whose ``max_model_len`` becomes the
context cap the gateway enforces for this key (as ``/v1/models`` says it); an error is rendered OpenAI-shaped
with the worker's status, as for a generation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from .auth import check_access
from .cors import EXTRA_HEADERS
from .errors import GatewayError, NoWorkerAvailable, UpstreamStatus, render
from .policy import TOKENIZE_FIELDS
from .policy import check as check_policy
from .protocol import load_body, parse_request
from .requestio import ClientGone, read_body, read_headers
from .routing import candidates, placements

if TYPE_CHECKING:
    from .proxy import Proxy

PATH = "/tokenize"
log = logging.getLogger("tokengate.tokenize")


class Tokenize:
    """The ASGI handler (mounted beside the generation routes, before FastAPI's machinery)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, body = await self._answer(scope, receive, headers)
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        except ClientGone:
            return
        except GatewayError as exc:
            status, rendered, body = render(exc)
            headers += rendered
        except Exception:  # a bug: OpenAI-shaped all the same, never a bare 500
            log.exception("unhandled error on %s", PATH)
            status, headers, body = render(GatewayError("internal error in the gateway"))
        extra = scope.get(EXTRA_HEADERS)  # (cors.py)
        await send({"type": "http.response.start", "status": status, "headers": headers + extra if extra else headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _answer(self, scope: dict[str, Any], receive: Any, headers: list[tuple[bytes, bytes]]
                      ) -> tuple[int, bytes]:
        proxy, s = self.proxy, self.proxy.settings
        region, _, length, authorization = read_headers(scope)
        principal = proxy.keys.authenticate(authorization)
        raw = await read_body(receive, length, s.max_body_bytes, s.body_timeout)
        request = load_body(raw)
        req = parse_request("chat" if "messages" in request else "completions", raw, request)
        check_policy(req, proxy.policy, TOKENIZE_FIELDS)
        snapshot = proxy.registry.snapshot
        info = proxy.model_info(req.model, snapshot)
        regions = proxy.regions_for(region, snapshot.workers)
        check_access(principal, req.model, regions[0])
        pool = candidates(snapshot, req.model, [r for r in regions if principal.allows_region(r)])
        if not pool:
            raise NoWorkerAvailable(f"no ready worker serves '{req.model}' in region '{regions[0]}'",
                                    retry_after=5, code="no_worker_in_region")
        ticket = await proxy.limiter.admit(principal, 0)
        try:
            headers += ticket.headers()
            status, body, retry_after = await proxy.dispatcher.tokenize(pool, raw)
        finally:
            await proxy.limiter.settle(ticket, 0)
        if status != 200:
            raise UpstreamStatus(status, body, retry_after)
        caps = principal.caps.apply(proxy.caps_for(req.model, info, placements(snapshot, pool), series=False))
        return status, _with_context_cap(body, caps.context_cap)


def _with_context_cap(body: bytes, cap: int) -> bytes:
    """The worker's answer with ``max_model_len`` lowered to the cap the gateway enforces (else as it came)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("max_model_len"), int) or doc["max_model_len"] <= cap:
        return body
    doc["max_model_len"] = cap
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes: the worker's body as it came
        return body
