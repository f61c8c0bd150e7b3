"""The ASGI application: FastAPI, with the generation routes taken before its machinery.

Starlette wraps every ``send`` of every request in its middlewares' closures (server errors, exception handlers,
the exit stack) and routes by walking a list; for a stream that is a few function calls per relayed chunk. The two
generation routes go straight to the pure-ASGI ``Proxy`` (which renders its own errors, unexpected ones included);
everything else — and anything but a POST to them — is FastAPI as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI

from .cors import EXTRA_HEADERS, Cors

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send)


class GatewayApp(FastAPI):
    fast_routes: dict[str, ASGIApp]  # pure ASGI, each adding EXTRA_HEADERS to its answers itself
    cors: Cors | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_routes = {}
        self.cors = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            own_send = send
            if self.cors is not None:
                scope, send, answered = await self._cross_origin(self.cors, scope, send)
                if answered:
                    return
            method = scope["method"]
            if method == "POST":
                handler = self.fast_routes.get(scope["path"])
                if handler is not None:
                    await handler(scope, receive, own_send)
                    return
            elif method == "HEAD" and scope["path"] not in self.fast_routes:
                # HEAD is GET without the body (RFC 9110 9.3.2; load balancers check health with it): the app
                # answers as for GET, and the server, whose own scope still says HEAD, leaves the body out
                scope = {**scope, "method": "GET"}
        await super().__call__(scope, receive, send)

    @staticmethod
    async def _cross_origin(cors: Cors, scope: Scope, send: Send) -> tuple[Scope, Send, bool]:
        """A preflight answered (True), or the request with the headers its answer carries."""
        origin = requested = method = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                method = value
            elif name == b"access-control-request-headers":
                requested = value
        if origin is None:
            return scope, send, False
        if scope["method"] == "OPTIONS" and method is not None:
            headers = cors.preflight(origin, requested)
            if headers is not None:
                await send({"type": "http.response.start", "status": 204, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return scope, send, True
        extra = cors.headers(origin)
        if extra is None:
            return scope, send, False

        async def send_with(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        scope = {**scope, EXTRA_HEADERS: extra}
        return scope, send_with, False
