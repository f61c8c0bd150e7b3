"""``POST /tokenize``: vLLM's own prompt count, through the gateway.

vLLM serves ``/tokenize`` (``{"model", "prompt" | "messages", ...}`` → ``{"count", "max_model_len", "tokens"}``);
clients use it to size prompts to a context — ``tokengate bench`` builds its prompts of a requested length with it.
The gateway forwards it to a ready worker of the model in the request's region, under the same key checks as a
generation (the key may use that model and region), with the same fallback to another worker when one can't be
reached, and answers with the worker's own body, whose ``max_model_len`` becomes the context cap the gateway
enforces for this key (as ``/v1/models`` says it). Not charged to the key's token budget: nothing is generated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from .auth import check_access
from .errors import GatewayError, InvalidRequest, ModelNotFound, NoWorkerAvailable, render
from .requestio import ClientGone, read_body, read_headers
from .routing import candidates, placements

if TYPE_CHECKING:
    from .proxy import Proxy

PATH = "/tokenize"


class Tokenize:
    """The ASGI handler (mounted beside the generation routes, before FastAPI's machinery)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            status, body = await self._answer(scope, receive)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        except ClientGone:
            return
        except GatewayError as exc:
            status, headers, body = render(exc)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _answer(self, scope: dict[str, Any], receive: Any) -> tuple[int, bytes]:
        proxy, s = self.proxy, self.proxy.settings
        region, _, length, authorization = read_headers(scope)
        principal = proxy.keys.authenticate(authorization)
        raw = await read_body(receive, length, s.max_body_bytes, s.body_timeout)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' is required and must be a non-empty string", param="model",
                                 code="invalid_type")
        snapshot = proxy.registry.snapshot
        info = snapshot.models.get(model)
        if info is None:
            raise ModelNotFound(f"The model `{model[:256]}` does not exist.", param="model")
        regions = proxy.regions_for(region, snapshot.workers)
        check_access(principal, model, regions[0])
        pool = candidates(snapshot, model, [r for r in regions if principal.allows_region(r)])
        if not pool:
            raise NoWorkerAvailable(f"no ready worker serves '{model}' in region '{regions[0]}'", retry_after=5,
                                    code="no_worker_in_region")
        status, body = await proxy.dispatcher.tokenize(pool, raw)
        if status == 200:
            caps = principal.caps.apply(proxy.caps_for(model, info, placements(snapshot, pool), series=False))
            body = _with_context_cap(body, caps.context_cap)
        return status, body


def _with_context_cap(body: bytes, cap: int) -> bytes:
    """The worker's answer with ``max_model_len`` lowered to the cap the gateway enforces (else as it came)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("max_model_len"), int) or doc["max_model_len"] <= cap:
        return body
    doc["max_model_len"] = cap
    return orjson.dumps(doc)
