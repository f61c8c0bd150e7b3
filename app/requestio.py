"""Reading an ASGI request: the headers the gateway uses, and the body within a size limit.

Starlette has no body limit; this one applies before anything is buffered beyond it — to a declared
Content-Length at once, and to a chunked body as it arrives.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .cors import EXTRA_HEADERS
from .errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedEncoding, UnsupportedMediaType

REGION_HEADER = b"x-tokengate-region"
# the request headers read_headers reads (every other one is skipped at the cost of one set lookup)
_READ = frozenset((b"content-length", b"authorization", REGION_HEADER, b"x-request-id", b"content-type", b"origin",
                   b"content-encoding"))


class ClientGone(Exception):
    """The client went away before its request body was complete."""


def read_headers(scope: dict[str, Any]) -> tuple[str | None, str | None, int | None, bytes | None]:
    """(region, request id, content length, authorization) from the request headers."""
    region = request_id = None
    length: int | None = None
    authorization: bytes | None = None
    page: bytes | None = None  # the Origin of a web page --cors-origin does not allow
    typed = False
    for name, value in scope["headers"]:
        if name not in _READ:
            continue
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
            named = value.decode("latin-1").strip() or None
            if region is not None and named != region:  # (which one would be a guess, and residency is no guess)
                raise InvalidRequest("more than one region in x-tokengate-region headers", param="region",
                                     code="ambiguous_region")
            region = named
        elif name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= 128 and text.isprintable() and " " not in text:
                request_id = text
        elif name == b"content-type":
            if value.strip():  # (an empty one is no type)
                if not _is_json(value):
                    raise UnsupportedMediaType(
                        f"request bodies of Content-Type '{value.decode('latin-1')[:64]}' are not supported: send "
                        "the JSON as application/json", param=None)
                typed = True
        elif name == b"origin":
            if EXTRA_HEADERS not in scope:  # (set for a page --cors-origin allows)
                page = value
        elif value.strip().lower() not in (b"", b"identity"):  # content-encoding
            raise UnsupportedEncoding(  # (it read as invalid JSON: "str is not valid UTF-8: surrogates not allowed")
                f"request bodies with Content-Encoding '{value.decode('latin-1')[:32]}' are not supported: send "
                "the JSON uncompressed", param=None)
    if page is not None and not typed:
        # What a page may send cross-origin without the browser asking first (no CORS preflight) is a body of
        # text/plain, a form type (refused above) or no type at all. A page that declares JSON is asked about
        # first, and refused unless allowed; a typeless one would have had a local open-mode gateway generate.
        raise UnsupportedMediaType(
            f"a request from the web page at '{page.decode('latin-1')[:100]}' must declare Content-Type: "
            "application/json (the gateway answers pages --cors-origin allows)", param=None)
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
