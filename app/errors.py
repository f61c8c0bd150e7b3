"""The gateway's one error tree, and the one place it becomes HTTP.

    GatewayError                       500 server_error
    ├── InvalidRequest                 400 invalid_request_error   (malformed JSON, wrong types, bad values)
    │   ├── ContextLengthExceeded      400 code=context_length_exceeded
    │   └── MaxTokensExceeded          400 code=max_tokens_exceeded (cap policy "reject")
    ├── AuthenticationFailed           401 invalid_request_error (as OpenAI answers a bad key)
    ├── PermissionDenied               403 permission_error
    ├── ModelNotFound                  404 code=model_not_found
    ├── PayloadTooLarge                413 code=request_too_large
    ├── UnsupportedEncoding            415 code=unsupported_content_encoding (a compressed request body)
    ├── UnsupportedMediaType           415 code=unsupported_media_type (a body not declared JSON)
    ├── HeadersTooLarge                431 code=request_header_fields_too_large
    ├── RequestTimeout                 408 code=request_timeout     (body not received in time)
    ├── RateLimited                    429 rate_limit_error        (Retry-After)
    ├── NoWorkerAvailable              503 code=no_worker_available (Retry-After)
    ├── GatewayOverloaded              503 code=gateway_overloaded  (Retry-After; out of file descriptors)
    ├── UpstreamError                  502 code=worker_unreachable / bad_worker_response
    │   └── UpstreamTimeout            504 code=worker_timeout
    └── UpstreamStatus                 the worker's own status and OpenAI-shaped body, passed through

Every class knows its status, OpenAI ``type`` and ``code``; ``render`` draws ``{"error": {...}}`` for all of them,
both as an HTTP body (before the first byte) and as one in-band SSE event (after it).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code_override = code

    @property
    def error_code(self) -> str | int | None:
        return self.code_override if self.code_override is not None else self.code

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []

    def payload(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.error_code}}

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class MaxTokensExceeded(InvalidRequest):
    code = "max_tokens_exceeded"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"www-authenticate", b'Bearer realm="tokengate"')]


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedEncoding(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"connection", b"close")]


class _RetryAfter(GatewayError):
    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(max(1, round(self.retry_after))).encode())]


class RateLimited(_RetryAfter):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None,
                 rate_headers: list[tuple[bytes, bytes]] | None = None, retry: bool = True) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.rate_headers = rate_headers or []  # OpenAI's x-ratelimit-* of the key's limits (limits.Budget)
        self.retry = retry  # False: no wait makes it succeed, and clients are told not to retry (x-should-retry)

    def headers(self) -> list[tuple[bytes, bytes]]:
        # the openai SDKs retry a 429 on their own (twice, by default) unless told otherwise
        out = super().headers() if self.retry else [(b"x-should-retry", b"false")]
        return out + self.rate_headers


def duration(seconds: float) -> bytes:
    """A wait as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``20ms``, ``6s``, ``1m30s``; whole seconds from
    1 s up, rounded up (a client that waits that long finds the budget there)."""
    if seconds <= 0:
        return b"0s"
    if seconds < 1:
        return b"%dms" % max(1, math.ceil(seconds * 1000 - 1e-6))
    whole = math.ceil(seconds - 1e-9)
    minutes, secs = divmod(whole, 60)
    return b"%dm%ds" % (minutes, secs) if minutes else b"%ds" % secs


class NoWorkerAvailable(_RetryAfter):
    status = 503
    type = "server_error"
    code = "no_worker_available"


class GatewayOverloaded(_RetryAfter):
    """The gateway itself ran out of something (file descriptors): not the worker's fault."""

    status = 503
    type = "server_error"
    code = "gateway_overloaded"


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "worker_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "worker_timeout"


class UpstreamStatus(GatewayError):
    """A worker answered with an error before the first byte: its status and (OpenAI-shaped) body pass through."""

    def __init__(self, status: int, body: bytes, retry_after: bytes | None = None) -> None:
        # only an error status passes through: a 1xx, 204, 3xx or 999 would break the client's HTTP framing (or
        # uvicorn, which knows no reason phrase for 999); the message still names it
        self.passthrough_status = status if 400 <= status <= 599 else 502
        self.raw = body
        message, param, code, type_ = _parse_worker_error(body, status)
        super().__init__(message, param=param, code=None if code is None else str(code))
        self.worker_type = type_
        self.worker_code = code  # as the worker sent it: vLLM's codes are numbers (400), OpenAI's strings
        # the worker's own back-off advice (a number of seconds) on a 429 or 503
        self.retry_after = (retry_after if retry_after is not None and retry_after.isdigit() and len(retry_after) < 10
                            and self.passthrough_status in (429, 503) else None)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.retry_after is None else [(b"retry-after", self.retry_after)]

    def payload(self) -> dict[str, object]:
        return {
            "error": {"message": self.message, "type": self.worker_type, "param": self.param, "code": self.worker_code}
        }


def in_band_error(err: Any) -> UpstreamStatus:
    """The error object of a worker's in-band error event (``data: {"error": ...}``), as the status it stands for:
    its code where that is an HTTP error status (vLLM's are), else 500."""
    status = 500
    if isinstance(err, dict) and type(err.get("code")) is int and 400 <= err["code"] < 600:
        status = err["code"]
    try:
        body = orjson.dumps({"error": err})
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads 1 024 levels, writes 254)
        body = b""
    return UpstreamStatus(status, body)


def _parse_worker_error(body: bytes, status: int) -> tuple[str, str | None, str | int | None, str]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    fallback = (f"worker answered HTTP {status}", None, None, kind)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return fallback
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        code = err.get("code")
        param = err.get("param")
        type_ = err.get("type")
        return (
            err["message"],
            param if isinstance(param, str) else None,
            # a string or a number, as sent (not the repr of anything else: 1 000 nested lists)
            code if isinstance(code, str) or type(code) is int and abs(code) < 10**9 else None,
            type_ if isinstance(type_, str) else fallback[3],
        )
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):  # plain FastAPI errors
        return doc["detail"], None, None, fallback[3]
    return fallback


def status_of(exc: GatewayError) -> int:
    return exc.passthrough_status if isinstance(exc, UpstreamStatus) else exc.status


def render(exc: GatewayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) for an error raised before the first byte."""
    body = exc.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *exc.headers(),
    ]
    return status_of(exc), headers, body


def sse_event(exc: GatewayError) -> bytes:
    """The same error as one in-band SSE event, for errors after the first byte."""
    return b"data: " + exc.body() + b"\n\n"
