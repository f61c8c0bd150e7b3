"""Calls from web pages (``--cors-origin``): the browser's preflight answered, and what every answer to an allowed
origin carries so the page may read it.

Off by default: a gateway that holds API keys is called by servers; a page that calls it directly (a playground,
an internal tool) is allowed by name, or ``*`` for any. Credentials (cookies) are never allowed: the key travels in
``Authorization``, which the preflight allows by echoing the headers the page asks for. A page not allowed
cannot have the gateway generate either: the one request it may send without the browser asking first that the
gateway would take (a body without a type) is refused (``requestio.read_headers``).
"""

from __future__ import annotations

from collections.abc import Iterable

# the gateway's own answers a page may want to read (the rest of OpenAI's, and every JSON body, are readable anyway)
EXPOSED = b", ".join((
    b"x-request-id", b"x-tokengate-worker", b"x-tokengate-max-tokens-clamped", b"retry-after", b"x-should-retry",
    *(b"x-ratelimit-%s-%s" % (what, unit) for unit in (b"requests", b"tokens")
      for what in (b"limit", b"remaining", b"reset")),
))
Headers = list[tuple[bytes, bytes]]

# scope key: headers every answer to this request carries (the CORS headers of an allowed origin; asgi.py sets it).
# The fast routes add them to their own (the generation routes may write straight to the socket), FastAPI's get them
# in ``send``; a request without it whose Origin names a page is one from a page not allowed (requestio.py).
EXTRA_HEADERS = "tokengate.headers"


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        listed = [o.strip().rstrip("/") for o in origins if o.strip()]
        self.any = "*" in listed
        self.origins = frozenset(o.lower().encode("latin-1") for o in listed if o != "*")

    def headers(self, origin: bytes) -> Headers | None:
        """What an answer to a request from ``origin`` carries; None for an origin not allowed."""
        if self.any:
            return [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", EXPOSED)]
        if origin.lower() not in self.origins:
            return None
        return [(b"access-control-allow-origin", origin), (b"vary", b"origin"),
                (b"access-control-expose-headers", EXPOSED)]

    def preflight(self, origin: bytes, requested_headers: bytes | None) -> Headers | None:
        """The answer to a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from ``origin``."""
        allowed = self.headers(origin)
        if allowed is None:
            return None
        return [*allowed, (b"access-control-allow-methods", b"GET, POST, HEAD, OPTIONS"),
                (b"access-control-allow-headers", requested_headers or b"authorization, content-type"),
                (b"access-control-max-age", b"600")]
