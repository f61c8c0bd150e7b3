"""OpenAPI documentation of the routes FastAPI can't see (pure ASGI: the two generation routes, proxy.py, and
``POST /tokenize``, tokenize_route.py).

Documentation only — protocol.py and policy.py decide what is accepted; the schema describes the same rules for
clients and for contract tests (tests/test_fuzz.py runs schemathesis against it).  It follows the gateway's
request policy: fields it refuses are left out, and unknown fields are documented as refused unless allowed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .policy import DANGEROUS_FIELDS, KNOWN_FIELDS, RequestPolicy
from .protocol import MAX_DEPTH, ROUTES, Route

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error"]},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            },
        }
    },
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_STR = {"type": "string"}
_OBJ = {"type": "object"}
_COMMON: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "minLength": 1, "description": "a model served by a ready worker (GET /v1/models)"},
    "stream": {**_nullable(_BOOL), "default": True,
               "description": "true unless false: the gateway streams by default"},
    "stream_options": _nullable({"type": "object", "properties": {"include_usage": _BOOL}}),
    "max_tokens": {**_nullable({"type": "integer", "minimum": 1}),
                   "description": "lowered (or refused) above the gateway's cap; absent: its default"},
    "temperature": _nullable(_NUM), "top_p": _nullable(_NUM), "seed": _nullable(_INT), "user": _STR,
    "stop": _nullable({"anyOf": [_STR, {"type": "array", "items": _STR}]}),
    "presence_penalty": _nullable(_NUM), "frequency_penalty": _nullable(_NUM),
    "logit_bias": _nullable({"type": "object", "additionalProperties": _NUM}),
    "response_format": _nullable(_OBJ),
    "top_k": _nullable(_INT), "min_p": _nullable(_NUM), "repetition_penalty": _nullable(_NUM),
    "min_tokens": {**_nullable({"type": "integer", "minimum": 0}), "description": "at most the max_tokens used"},
    "ignore_eos": _nullable(_BOOL), "skip_special_tokens": _nullable(_BOOL), "echo": _nullable(_BOOL),
}
_CONTENT_PART = {"type": "object", "required": ["type"], "properties": {"type": _STR},
                 "description": "media by URL is refused unless allowed: only inline data: URLs"}
_CHAT: dict[str, dict[str, Any]] = {
    "messages": {
        "type": "array", "minItems": 1,
        "items": {
            "type": "object", "required": ["role"],
            "properties": {
                "role": {"type": "string", "minLength": 1},
                "content": _nullable({"anyOf": [_STR, {"type": "array", "items": _CONTENT_PART}]}),
            },
        },
    },
    "max_completion_tokens": {**_nullable({"type": "integer", "minimum": 1}),
                              "description": "wins over max_tokens; capped like it"},
    "logprobs": _nullable(_BOOL),
    "tools": _nullable({"type": "array", "items": _OBJ}),
}
_COMPLETIONS: dict[str, dict[str, Any]] = {
    "prompt": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "minItems": 1,
         "items": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}},
    ]},
}
_PASSED_THROUGH = {"description": "passed through to the worker (vLLM)"}
_REQUIRED: dict[Route, list[str]] = {"chat": ["model", "messages"], "completions": ["model", "prompt"]}
_SUMMARY: dict[Route, str] = {"chat": "Create a chat completion", "completions": "Create a completion"}
_ERRORS = {
    "400": "invalid request: malformed JSON, a wrong type or value, a refused field, or a prompt above the cap",
    "401": "missing or unknown API key", "403": "the key may not use this model or region",
    "404": "unknown model", "413": "request body too large", "429": "rate limit or queue full (Retry-After)",
    "502": "the worker failed", "503": "no ready worker, or shutting down (Retry-After)",
    "504": "the worker did not answer in time",
}


def _capped(policy: RequestPolicy, route: Route) -> dict[str, dict[str, Any]]:
    logprobs = _nullable({"type": "integer", "minimum": 0, "maximum": policy.max_logprobs})
    out = {"n": _nullable({"type": "integer", "minimum": 1, "maximum": policy.max_n}),
           "top_logprobs": logprobs, "prompt_logprobs": logprobs}
    if route == "completions":
        out["logprobs"] = logprobs
    return out


def request_schema(route: Route, policy: RequestPolicy) -> dict[str, Any]:
    """JSON schema of a request body on ``route`` under ``policy``."""
    fields = {**_COMMON, **(_CHAT if route == "chat" else _COMPLETIONS), **_capped(policy, route)}
    refused = {"best_of", *(f for f in DANGEROUS_FIELDS if f not in policy.allow_fields)}
    props = {name: fields.get(name, _PASSED_THROUGH) for name in sorted(KNOWN_FIELDS[route]) if name not in refused}
    return {
        "type": "object",
        "required": _REQUIRED[route],
        "properties": props,
        "additionalProperties": policy.allow_unknown_fields,
        "description": f"nested at most {MAX_DEPTH} levels deep",
    }


def generation_paths(policy: RequestPolicy) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, route in ROUTES.items():
        responses: dict[str, Any] = {
            "200": {
                "description": "a stream of server-sent events ending with `data: [DONE]` (errors after the first "
                               "byte are one in-band `data: {\"error\": ...}` event), or one JSON object when "
                               "`stream` is false",
                "content": {"text/event-stream": {"schema": _STR}, "application/json": {"schema": _OBJ}},
            },
        }
        for status, why in _ERRORS.items():
            responses[status] = {"description": why, "content": {"application/json": {"schema": _ERROR_REF}}}
        paths[path] = {"post": {
            "tags": ["openai"],
            "summary": _SUMMARY[route],
            "operationId": f"create_{route}",
            "parameters": [
                {"name": "x-tokengate-region", "in": "header", "required": False, "schema": _STR,
                 "description": "region to serve the request in (default: the gateway's --region)"},
                {"name": "x-request-id", "in": "header", "required": False, "schema": _STR,
                 "description": "echoed back; the worker gets it with a suffix of its own (when printable, at most "
                                "128 characters, no spaces), so a reused id still names one request"},
            ],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": request_schema(route, policy)},
            }},
            "responses": responses,
        }}
    return paths


def tokenize_paths() -> dict[str, Any]:
    """``POST /tokenize`` (tokenize_route.py): vLLM's own, passed through."""
    ok = {"type": "object", "required": ["count"],
          "properties": {"count": {"type": "integer", "minimum": 0}, "max_model_len": _INT,
                         "tokens": {"type": "array", "items": _INT}}}
    responses: dict[str, Any] = {"200": {
        "description": "the worker's own answer, its max_model_len lowered to the context cap this gateway enforces",
        "content": {"application/json": {"schema": ok}}}}
    for status in ("400", "401", "403", "404", "413", "429", "502", "503", "504"):
        responses[status] = {"description": _ERRORS[status],
                             "content": {"application/json": {"schema": _ERROR_REF}}}
    responses["422"] = {"description": "the worker's own refusal of the body",
                        "content": {"application/json": {"schema": _OBJ}}}
    body = {"type": "object", "required": ["model"], "additionalProperties": True,
            "properties": {"model": _COMMON["model"], "prompt": _STR, "messages": _CHAT["messages"],
                           "add_generation_prompt": _BOOL, "add_special_tokens": _BOOL}}
    return {"/tokenize": {"post": {
        "tags": ["vllm"],
        "summary": "Count a prompt's tokens as the worker does (vLLM's /tokenize)",
        "operationId": "tokenize",
        "parameters": [{"name": "x-tokengate-region", "in": "header", "required": False, "schema": _STR,
                        "description": "region whose worker counts (default: the gateway's --region)"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": responses,
    }}}


def document_generation_routes(app: FastAPI, policy: RequestPolicy) -> None:
    """Add the generation routes to ``app``'s /openapi.json."""
    build = app.openapi  # FastAPI's own: documents its routes, caches the result in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema["paths"] = {**generation_paths(policy), **tokenize_paths(), **schema["paths"]}
            schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_RESPONSE
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
