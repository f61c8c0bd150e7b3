"""SSE parsing for the relay: cut a worker's byte stream at event boundaries and learn what the metrics need.

Events are parsed only to find the first content token, the usage event, ``[DONE]``, error events and malformed
input; the complete events are returned as the bytes they came as (the usage event the gateway asked for on the
client's behalf removed again when the client did not ask for it). Pure: no I/O (fuzzed in the tests).

Each ``data: {...}`` event is decoded by a typed msgspec decoder that builds only the few fields read here
(``choices[].text``/``delta``, ``usage``, ``error``) and skips the rest: about half the cost of building the
whole object, on the path every token takes. An event of another shape (``choices`` not a list of objects, a
``usage`` that is not an object, ...) goes the general way, through ``orjson``, with the same outcome. With a sink
(the non-streaming aggregator) its own strict typed reader (``take``) goes first and every event it declines is
built whole for the sink (``add``). Differences left on purpose, in
events no engine sends: a number beyond a double's range in a field the relay does not read passes (orjson refused
the event), an integer wider than 64 bits in ``usage`` stays an int (orjson made it a float), and nesting deeper than
orjson's 1024 levels passes where Python's recursion limit allows it (shallower than that limit, a decoder that
runs out of depth falls back to orjson).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson

from .metrics import OVERHEAD_BUCKETS
from .upstream import UpstreamProtocolError

MAX_EVENT_BYTES = 4 * 1024 * 1024
_RELAY_BOUNDS = (*OVERHEAD_BUCKETS, math.inf)  # a histogram's bucket i holds what is <= bound i

# A sink's typed reader (``aggregate.StreamAggregator.take``): takes an event's JSON whole and returns what the parser
# learns of it; raises msgspec's errors, having taken nothing, on an event for the general way.
Seen = tuple[bool, dict[str, Any] | None, bool]  # (has content, usage, has choices)
Take = Callable[[bytes], Seen]


def _has_content(obj: dict[str, Any]) -> bool:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
            or delta.get("tool_calls")
        ):
            return True
    return False


# The typed view of an event: only what the relay reads. Any other shape fails validation and is read the
# general way (``_has_content`` above), so both ways agree (tests/test_fuzz.py checks it).
class _Delta(msgspec.Struct):
    content: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    tool_calls: Any = None


class _Choice(msgspec.Struct):
    text: Any = None
    delta: _Delta | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = msgspec.UNSET


_decode_event = msgspec.json.Decoder(_Event).decode


def _event_has_content(choices: list[_Choice]) -> bool:
    for choice in choices:
        if choice.text:
            return True
        d = choice.delta
        if d is not None and (d.content or d.reasoning_content or d.reasoning or d.tool_calls):
            return True
    return False


@dataclass(slots=True)
class SSEState:
    """What the relay learnt from one stream."""

    first_token: float | None = None
    last_token: float | None = None
    usage: dict[str, Any] | None = None
    content_events: int = 0
    saw_done: bool = False
    saw_error: bool = False
    error: Any = None  # the "error" of the worker's own error event, which ends the stream (vLLM sends [DONE] after)
    chunks: int = 0
    relay_seconds: float = 0.0
    # per relayed chunk, the time it spent in the gateway, counted by bucket of the overhead histogram (index:
    # count, only the buckets hit: a short stream's one or two chunks)
    relay_buckets: dict[int, int] = field(default_factory=dict, repr=False)
    _pending: bytes = field(default=b"", repr=False)

    def token(self, now: float) -> None:
        """An event with content, read at ``now``."""
        self.content_events += 1
        if self.first_token is None:
            self.first_token = now
        self.last_token = now

    def relayed(self, seconds: float) -> None:
        """One chunk passed on, ``seconds`` after its read arrived."""
        self.chunks += 1
        self.relay_seconds += seconds
        buckets = self.relay_buckets
        i = bisect_left(_RELAY_BOUNDS, seconds)
        buckets[i] = buckets.get(i, 0) + 1


class SSEParser:
    """Feeds raw body bytes, returns the complete events to forward. Pure: no I/O (fuzzed in the tests)."""

    __slots__ = ("include_usage", "state", "sink", "take")

    def __init__(self, include_usage: bool, sink: Callable[[dict[str, Any]], None] | None = None,
                 take: Take | None = None) -> None:
        self.include_usage = include_usage
        self.state = SSEState()
        self.sink = sink  # gets every parsed event object (the non-streaming aggregator)
        self.take = take  # or, first, the JSON of an event, which it takes whole if it can (aggregate.take)

    def feed(self, chunk: bytes, now: float) -> bytes:
        """The complete events of ``chunk`` (and of what was pending) to pass on. After the worker's own error event
        nothing more is: the stream has failed, and vLLM's ``[DONE]`` after it would make it look finished."""
        st = self.state
        if st.saw_error:
            return b""
        data = st._pending + chunk if st._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        # what stays pending is bounded, also when it follows complete events in the same chunk
        if len(data) - (end + 2 if end >= 0 else 0) > MAX_EVENT_BYTES:
            raise UpstreamProtocolError("worker sent an SSE event larger than the limit")
        if end < 0:
            st._pending = data
            return b""
        if end + 2 == len(data):
            out = data
            st._pending = b""
        else:
            out = data[: end + 2]
            st._pending = data[end + 2:]
        if data.find(b"\n\n") == end:  # one event: how a paced stream's reads come
            if self._drop(out[:end], now):
                return b""
            if st.saw_error:
                st._pending = b""
            return out
        kept: list[bytes] | None = None
        events = out.split(b"\n\n")
        events.pop()  # out ends with the separator
        drop = self._drop
        for i, event in enumerate(events):
            if drop(event, now):
                if kept is None:
                    kept = events[:i]
            elif kept is not None:
                kept.append(event)
            if st.saw_error:  # the last event passed on
                st._pending = b""
                if kept is None:
                    kept = events[: i + 1]
                break
        if kept is None:
            return out
        return b"".join(e + b"\n\n" for e in kept)

    def _drop(self, event: bytes, now: float) -> bool:
        """Inspect one event; True when it must not reach the client (the usage event nobody asked for)."""
        if event.startswith(b"data: {"):
            take = self.take
            if take is not None:
                try:
                    content, usage, has_choices = take(event[6:])
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    pass  # another shape, or not JSON: the general way says which
                else:
                    return self._learn(usage, has_choices, content, now)
            elif self.sink is None:
                payload = event[6:]
                try:
                    if not payload.isascii():
                        payload.decode()  # the typed decoder does not check the UTF-8 of the strings it skips
                    ev = _decode_event(payload)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # (ValidationError is one too)
                    pass  # another shape, not JSON, or too deep for the typed decoder: the general way says which
                else:
                    if ev.error is not msgspec.UNSET:
                        self.state.saw_error = True
                        self.state.error = ev.error
                        return False
                    choices = ev.choices
                    if ev.usage is None:  # a token, the role or the finish: _learn's case without usage, inline
                        if choices and _event_has_content(choices):
                            self.state.token(now)
                        return False
                    return self._learn(ev.usage, bool(choices), _event_has_content(choices) if choices else False,
                                       now)
        return self._drop_general(event, now)

    def _learn(self, usage: dict[str, Any] | None, has_choices: bool, content: bool, now: float) -> bool:
        """Note an event's usage and content (the three ways of reading one agree on these); True for the usage
        event the client did not ask for."""
        st = self.state
        if usage is not None:
            st.usage = usage
            if not has_choices:
                return not self.include_usage
        if content:
            st.token(now)
        return False

    def _drop_general(self, event: bytes, now: float) -> bool:
        st = self.state
        if event.startswith(b"\n"):  # empty lines before it (valid SSE): a run of 3+ line ends splits this way
            event = event.lstrip(b"\n")
        if not event.startswith(b"data:"):
            if event.startswith((b":", b"event:", b"id:", b"retry:")) or not event.strip():
                return False  # SSE comment / keep-alive / fields we pass along
            raise UpstreamProtocolError("worker sent a malformed SSE line")
        payload = event[5:].lstrip(b" ")
        if payload.startswith(b"[DONE]"):
            st.saw_done = True
            return False
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("worker sent an SSE event that is not valid JSON") from None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError("worker sent an SSE event that is not a JSON object")
        if self.sink is not None:
            self.sink(obj)
        if "error" in obj:
            st.saw_error = True
            st.error = obj["error"]
            return False
        usage = obj.get("usage")
        return self._learn(usage if isinstance(usage, dict) else None, bool(obj.get("choices")), _has_content(obj),
                           now)

    @property
    def pending(self) -> bytes:
        return self.state._pending
