"""The direct way from a relay to the client's connection: what the HTTP server offers beside the ASGI ``send``
(``httpserver``), and what the relay writes through (``streaming``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

CLIENT_WRITER = "tokengate.client"  # the ASGI scope extension under which the server offers a ClientWriter


class ClientWriter(Protocol):
    """Writes a response straight to the client's connection, beside the ASGI ``send``: the head with the first
    body chunk, each later chunk, the end — fewer writes, and no message objects per chunk."""

    def can_start(self) -> bool:
        """Nothing of the response has gone out yet, and the client is still there."""
        ...

    def start(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, end: bool) -> None:
        """A chunked response's head and first chunk (and its end, with ``end``)."""
        ...

    def write(self, data: bytes) -> None:
        """One more chunk (dropped when the client has gone: its watcher notices)."""
        ...

    def end(self, data: bytes) -> None:
        """The last chunk and the end of the response."""
        ...

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole response with a Content-Length."""
        ...

    @property
    def write_paused(self) -> bool: ...

    async def drain(self) -> None:
        """Wait until the client's connection takes writes again (or is gone)."""
        ...

    def drop(self) -> None:
        """Close the connection at once, unsent data discarded (a client that stopped reading), as one lost."""
        ...

    def watch(self, on_lost: Callable[[], None]) -> bool:
        """Have ``on_lost`` called when the connection is lost before the response is complete; False when it
        is lost already."""
        ...
