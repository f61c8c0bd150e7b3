"""The calibration baseline: a straightforward FastAPI ``StreamingResponse`` + httpx relay, as one would first write it.

Not the gateway; the "how bad is the obvious thing" arm of ``bench/overhead.py``.

    python -m bench.naive_relay --port 8000 --upstream http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask


def create_app(upstream: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        async with httpx.AsyncClient(base_url=upstream, timeout=600.0, limits=limits) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ok"}

    async def relay(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        body = await request.body()
        payload: Any = orjson.loads(body)
        req = client.build_request("POST", request.url.path, content=body,
                                   headers={"content-type": "application/json"})
        upstream_resp = await client.send(req, stream=True)
        if isinstance(payload, dict) and payload.get("stream") is True:
            return StreamingResponse(upstream_resp.aiter_raw(), status_code=upstream_resp.status_code,
                                     media_type=upstream_resp.headers.get("content-type"),
                                     background=BackgroundTask(upstream_resp.aclose))
        content = await upstream_resp.aread()
        await upstream_resp.aclose()
        return Response(content, status_code=upstream_resp.status_code,
                        media_type=upstream_resp.headers.get("content-type"))

    app.add_api_route("/v1/chat/completions", relay, methods=["POST"])
    app.add_api_route("/v1/completions", relay, methods=["POST"])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--upstream", default="http://127.0.0.1:8001")
    a = p.parse_args(argv)
    uvicorn.run(create_app(a.upstream), host=a.host, port=a.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", backlog=4096)


if __name__ == "__main__":
    main()
