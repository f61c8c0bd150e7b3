"""Routes. Thin: each one reads lifespan state and picks the response type.

The two generation routes are mounted as the pure-ASGI ``Proxy`` (see proxy.py); everything else is FastAPI.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from . import multiproc
from .errors import AuthenticationFailed, InvalidRequest, ModelNotFound, PermissionDenied
from .routing import placement_names
from .state import AppState
from .workers.logs import tail

router = APIRouter()


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.tokengate
    return state


State = Annotated[AppState, Depends(get_state)]


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    """The process is alive (says nothing about workers: see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(state: State) -> JSONResponse:
    """200 when at least one worker is ready and the gateway is not draining; lists every worker either way."""
    sup = state.supervisor
    workers = [
        {
            "name": w.name,
            "region": w.region,
            "preset": w.preset,
            "ready": w.ready,
            "reason": w.reason,
            "models": sorted(w.models),
            "in_flight": w.in_flight,
            "managed": sup is not None and sup.spec_of(w.name) is not None,
            "pid": sup.pid_of(w.name) if sup is not None else None,
            "restarts": sup.restarts_of(w.name) if sup is not None else 0,
        }
        for w in state.registry.workers()
    ]
    ready = any(w["ready"] for w in workers) and not state.proxy.draining
    not_ready = [w["name"] for w in workers if not w["ready"]]
    body: dict[str, Any] = {"ready": ready, "draining": state.proxy.draining, "workers": workers,
                            "not_ready": not_ready}
    return JSONResponse(body, status_code=200 if ready else 503)


RegionQuery = Annotated[str | None, Query(max_length=64)]
RegionHeader = Annotated[str | None, Header(max_length=64)]


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request, state: State, region: RegionQuery = None,
                      x_tokengate_region: RegionHeader = None) -> dict[str, Any]:
    """Every model a ready worker serves that the caller's key may use, with the context cap the gateway enforces
    (the key's own, if lower) as ``max_model_len``. With a region (``?region=``, else ``x-tokengate-region`` as
    generation requests send it): only what a request for that region would reach (its fallbacks included)."""
    return {"object": "list", "data": _model_cards(request, state, region, x_tokengate_region)}


@router.get("/v1/models/{model:path}", tags=["openai"])
async def retrieve_model(model: str, request: Request, state: State, region: RegionQuery = None,
                         x_tokengate_region: RegionHeader = None) -> dict[str, Any]:
    """One model's card, as in ``/v1/models`` (the openai SDK's ``models.retrieve``); 404 when the key can't see
    it."""
    for card in _model_cards(request, state, region, x_tokengate_region):
        if card["id"] == model:
            return card
    raise ModelNotFound(f"The model `{model[:256]}` does not exist.", param="model")


def _model_cards(request: Request, state: AppState, query: str | None, header: str | None) -> list[dict[str, Any]]:
    """The cards of the models a request could use: with a region (``?region=``, else the header), those the region
    or its fallbacks serve, else every one. A region that does not exist is a 400, as on the generation routes."""
    principal = state.proxy.keys.authenticate(request.headers.get("authorization"))
    snapshot = state.registry.snapshot
    region = (query or header or "").strip() or None
    route = None
    if region is not None:
        try:
            route = state.proxy.regions_for(region, snapshot.workers)
        except InvalidRequest as exc:
            exc.param = "region" if (query or "").strip() else exc.param
            raise
    if route is not None and not principal.allows_region(route[0]):
        return []  # a generation request naming it would be refused (403), whatever its fallbacks serve
    data = []
    for mid in sorted(snapshot.models):
        if not principal.allows_model(mid):
            continue
        workers = snapshot.by_model.get(mid, ())
        regions = sorted(r for r in {w.region for w in workers} if principal.allows_region(r))
        # the caps of the presets a request would meet: those of the first region of its route that serves the
        # model (as routing picks), or without a region the tightest of every allowed region's
        if route is not None:
            regions = [r for r in route if r in regions]  # where a request for that region can go, in its order
            if not regions:
                continue
            pool = [w for w in workers if w.region == regions[0]]
        elif regions:
            pool = [w for w in workers if w.region in regions]
        else:
            continue
        caps = principal.caps.apply(state.proxy.caps_for(mid, snapshot.models[mid], placement_names(pool),
                                                         series=False))
        data.append({
            "id": mid,
            "object": "model",
            "created": state.started_at,
            "owned_by": "tokengate",
            "max_model_len": caps.context_cap,
            "regions": regions,
        })
    return data


def _admin(request: Request, state: AppState) -> None:
    key = state.settings.admin_key
    if key is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise AuthenticationFailed("admin endpoints need 'Authorization: Bearer <admin key>'")
        return
    host = request.client.host if request.client else ""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise PermissionDenied("admin endpoints answer loopback clients only unless --admin-key is set")


@router.get("/admin/workers/{name}/log", tags=["ops"], response_class=PlainTextResponse)
async def worker_log(name: str, request: Request, state: State,
                     lines: Annotated[int, Query(ge=1, le=10_000)] = 200) -> PlainTextResponse:
    """The last ``lines`` lines of a managed worker's log file."""
    _admin(request, state)
    spec = state.supervisor.spec_of(name) if state.supervisor is not None else None
    if spec is None:
        raise ModelNotFound(f"no managed worker named '{name[:64]}'", code="worker_not_found")
    return PlainTextResponse(await asyncio.to_thread(tail, spec.log_path, lines))


@router.get("/metrics", tags=["ops"])
async def metrics(state: State) -> Response:
    """Prometheus text. With --workers N, every process's values, summed (prometheus-client multiprocess mode)."""
    source = await multiproc.view(state.prom_registry, multiproc.shared_dir(state.settings.workers))
    return Response(await state.exposition.render_stepwise(source), media_type=CONTENT_TYPE_LATEST)
