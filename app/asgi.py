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

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]  # (scope, receive, send)


class GatewayApp(FastAPI):
    fast_routes: dict[str, ASGIApp]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast_routes = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            if method == "POST":
                handler = self.fast_routes.get(scope["path"])
                if handler is not None:
                    await handler(scope, receive, send)
                    return
            elif method == "HEAD" and scope["path"] not in self.fast_routes:
                # HEAD is GET without the body (RFC 9110 9.3.2; load balancers check health with it): the app
                # answers as for GET, and the server, whose own scope still says HEAD, leaves the body out
                scope = {**scope, "method": "GET"}
        await super().__call__(scope, receive, send)
