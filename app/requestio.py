"""Reading an ASGI request: the headers the gateway uses, and the body within a size limit.

Starlette has no body limit; this one applies before anything is buffered beyond it — to a declared
Content-Length at once, and to a chunked body as it arrives.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .asgi import EXTRA_HEADERS
from .errors import (
    InvalidRequest,
    OriginNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedEncoding,
    UnsupportedMediaType,
)

REGION_HEADER = b"x-tokengate-region"


class ClientGone(Exception):
    """The client went away before its request body was complete."""


def read_headers(scope: dict[str, Any]) -> tuple[str | None, str | None, int | None, bytes | None]:
    """(region, request id, content length, authorization) from the request headers."""
    region = request_id = None
    length: int | None = None
    authorization: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header", param=None) from None
        elif name == b"authorization":
            if authorization is not None:
                raise InvalidRequest("more than one Authorization header", param=None)
            authorization = value
        elif name == REGION_HEADER:
            region = value.decode("latin-1").strip() or None
        elif name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable() and " " not in text:
                request_id = text
        elif name == b"origin" and EXTRA_HEADERS not in scope:  # (set for a page --cors-origin allows)
            # a page's request the browser sends without asking first (no CORS preflight: a body without a type);
            # its answer would be kept from the page, but the generation would run
            raise OriginNotAllowed(
                f"requests from web pages at origin '{value.decode('latin-1')[:100]}' are not allowed: the gateway "
                "allows a page with --cors-origin", param=None)
        elif name == b"content-type" and not _is_json(value):
            # a browser sends text/plain and the form types cross-origin without asking first (no CORS
            # preflight): refusing them keeps a web page from spending a local open-mode gateway's GPUs
            raise UnsupportedMediaType(
                f"request bodies of Content-Type '{value.decode('latin-1')[:64]}' are not supported: send the JSON "
                "as application/json", param=None)
        elif name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise UnsupportedEncoding(  # (it read as invalid JSON: "str is not valid UTF-8: surrogates not allowed")
                f"request bodies with Content-Encoding '{value.decode('latin-1')[:32]}' are not supported: send "
                "the JSON uncompressed", param=None)
    return region, request_id, length, authorization


def _is_json(content_type: bytes) -> bool:
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def read_body(receive: Any, length: int | None, limit: int, timeout: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout`` seconds (a body trickled byte by byte is a
    slowloris: 408, and the connection closes)."""
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is larger than the limit of {limit} bytes")
    message = await receive()  # usually the whole body, already here: no timer for the common case
    if message["type"] == "http.request" and not message.get("more_body", False):
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        return body
    try:
        async with asyncio.timeout(timeout):
            return await _read(receive, limit, message)
    except TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout:g} s") from None


async def _read(receive: Any, limit: int, message: dict[str, Any]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
        message = await receive()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
