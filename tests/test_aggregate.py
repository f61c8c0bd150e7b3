"""The non-streaming aggregator: a worker's stream gathered into one answer. A worker answer of another shape
must be a protocol error (a 502), never an exception of ours."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.aggregate import StreamAggregator
from app.errors import GatewayError
from app.sse import SSEParser

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "tiny"}


def tok(delta: dict[str, Any] | None = None, **choice: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0, **choice}
    if delta is not None:
        c["delta"] = delta
    return {**HEAD, "choices": [c]}


def usage(**extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, **extra}}


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def build(route: str, events: list[dict[str, Any]]) -> tuple[Any, int]:
    """(the answer or the error, parser state)"""
    agg = StreamAggregator(route)
    parser = SSEParser(True, sink=agg.add)
    try:
        parser.feed(sse(events), 1.0)
        doc: Any = agg.result()
    except GatewayError as exc:
        doc = (type(exc).__name__, exc.status, str(exc))
    st = parser.state
    return doc, (st.usage, st.content_events, st.first_token)


@pytest.mark.parametrize("route", ["chat", "completion"])
@pytest.mark.parametrize("events", [
    [{**HEAD, "choices": 5}],
    [{**HEAD, "choices": {"0": {}}}],
    [tok({"content": "x"}, index=[1])],
    [tok({"content": "x"}, index="0")],
    [tok({"content": "x"}, index=None)],
    [tok({"content": "x"}), tok({"content": "y"}, index=1.0)],
    [tok({"tool_calls": [{"index": [], "function": {"name": "f"}}]})],
    [tok({"tool_calls": [{"index": 0}, {"index": "x"}]})],
], ids=str)
def test_a_worker_answer_of_another_shape_is_a_protocol_error(route: str, events: list[dict[str, Any]]) -> None:
    outcome, _ = build(route, events)
    if route == "completion" and "tool_calls" in str(events):
        assert isinstance(outcome, dict)  # a completion's answer has no tool calls to read
    else:
        assert outcome[:2] == ("UpstreamProtocolError", 502)


@pytest.mark.parametrize("events", [
    [tok(7)], [tok("x")], [tok({"tool_calls": [{"function": 3}]})], [tok({"tool_calls": 5})],
    [tok({"tool_calls": [7, {"function": {"name": "f", "arguments": 1}}]})],
], ids=str)
def test_odd_deltas_are_read_as_nothing(events: list[dict[str, Any]]) -> None:
    doc, _ = build("chat", events)
    assert isinstance(doc, dict) and doc["choices"][0]["message"]["content"] in ("", None)
