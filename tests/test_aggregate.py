"""The non-streaming aggregator: a worker's stream gathered into one answer. Its typed way (``take``, the events
vLLM writes) must build exactly what its general way (``add``, every object whole) does, and a worker answer of
another shape must be a protocol error (a 502), never an exception of ours. tests/test_fuzz.py fuzzes the same."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
import pytest

from app.aggregate import StreamAggregator
from app.errors import GatewayError, status_of
from app.sse import SSEParser
from app.upstream import UpstreamProtocolError

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "tiny"}


def tok(delta: dict[str, Any] | None = None, **choice: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"index": 0, **choice}
    if delta is not None:
        c["delta"] = delta
    return {**HEAD, "choices": [c]}


def usage(**extra: Any) -> dict[str, Any]:
    return {**HEAD, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, **extra}}


def sse(events: list[dict[str, Any]]) -> bytes:  # (json: integers of any width, any depth)
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def build(route: str, events: list[dict[str, Any]], typed: bool) -> tuple[Any, int]:
    """(the answer or the error, how many events the typed way took)"""
    agg = StreamAggregator(route)
    taken = 0

    def take(payload: bytes) -> Any:
        nonlocal taken
        seen = agg.take(payload)
        taken += 1
        return seen

    parser = SSEParser(True, sink=agg.add, take=take if typed else None)
    try:
        parser.feed(sse(events), 1.0)
        doc: Any = agg.result()
    except GatewayError as exc:
        doc = (type(exc).__name__, status_of(exc), str(exc))
    st = parser.state
    return (doc, st.usage, st.content_events, st.first_token), taken


# (route, events, how many of them the typed way takes)
CASES = {
    "vLLM chat stream": ("chat", [
        {**tok({"role": "assistant", "content": ""}, logprobs=None, finish_reason=None),
         "prompt_token_ids": None, "prompt_text": None},
        tok({"content": " a"}, logprobs=None, finish_reason=None, token_ids=None),
        {**tok({"content": " b"}, logprobs=None, finish_reason="length", stop_reason=None, token_ids=None),
         "system_fingerprint": "fp-1"},
        usage(prompt_tokens_details={"cached_tokens": 0}),
    ], 4),
    "vLLM completion stream": ("completion", [
        tok(text=" a", logprobs=None, finish_reason=None, stop_reason=None),
        tok(text=" b", logprobs=None, finish_reason="stop", stop_reason=13, prompt_token_ids=None),
        usage(),
    ], 3),
    "an empty role is not kept": ("chat", [tok({"role": "", "content": "x"})], 1),
    "a stop reason 0 is kept; null does not clear it": ("chat", [
        tok({"content": "x"}, stop_reason=0), tok({"content": "y"}, stop_reason=None)], 2),
    "reasoning of both names, in order": ("chat", [
        tok({"reasoning_content": "r1"}), tok({"reasoning": "q"}), tok({"reasoning_content": "r2", "content": "c"})],
        3),
    "the first id wins, null included": ("chat", [{**tok({"content": "x"}), "id": None}, tok({"content": "y"})], 2),
    "the first system fingerprint wins": ("chat", [
        {**tok({"content": "x"}), "system_fingerprint": "a"}, {**tok({"content": "y"}), "system_fingerprint": "b"}],
        2),
    "text in a chat stream and a delta in a completion stream are not content": ("chat", [
        tok({"content": ""}, text="t"), tok({"content": "x"})], 2),
    "delta in a completion stream": ("completion", [tok({"content": "d"}, text="x")], 1),
    "two choices interleaved": ("chat", [
        {**HEAD, "choices": [{"index": 1, "delta": {"content": "b"}}, {"index": 0, "delta": {"content": "a"}}]},
        {**HEAD, "choices": [{"index": 0, "delta": {"content": "c"}, "finish_reason": "stop"}]},
        {**HEAD, "choices": [{"index": 1, "delta": {"content": "d"}, "finish_reason": "length"}]}], 3),
    "content, then tool calls the general way": ("chat", [
        tok({"content": "x"}),
        tok({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                             "function": {"name": "f", "arguments": "{"}}]}),
        tok({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}, finish_reason="tool_calls")], 1),
    "tool calls only: content null": ("chat", [
        tok({"role": "assistant", "content": ""}),
        tok({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]})], 1),
    "logprobs, the general way": ("completion", [
        tok(text="a", logprobs={"tokens": ["a"], "token_logprobs": [-0.1]}),
        tok(text="b"), tok(text="c", logprobs={"tokens": ["c"], "token_logprobs": [-0.2]})], 1),
    "integers wider than 64 bits, the general way": ("chat", [
        tok({"content": "x"}, stop_reason=2**63), usage(prompt_tokens=2**64 - 1), usage(prompt_tokens=2**63 - 1)], 1),
    "fields vLLM does not send, the general way": ("chat", [
        {**tok({"content": "x"}), "service_tier": "s"}, tok({"content": "y", "x": 1}), tok({"content": "z"}, x=1)],
        0),
    "an error event": ("chat", [tok({"content": "x"}), {"error": {"message": "boom", "code": 503}}], 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_typed_way_builds_what_the_general_way_does(name: str) -> None:
    route, events, typed_events = CASES[name]
    typed, taken = build(route, events, typed=True)
    general, _ = build(route, events, typed=False)
    assert typed == general
    assert taken == typed_events  # the typed way is really taken where vLLM's shape allows it


def test_what_the_answer_holds() -> None:
    (doc, *_), _ = build("chat", CASES["vLLM chat stream"][1], typed=True)
    assert doc == {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "tiny",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": " a b"}, "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}],
                   "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}},
                   "system_fingerprint": "fp-1"}
    (doc, *_), _ = build("chat", CASES["tool calls only: content null"][1], typed=True)
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("route", ["chat", "completion"])
@pytest.mark.parametrize("events", [
    [{**HEAD, "choices": 5}],
    [{**HEAD, "choices": {"0": {}}}],
    [tok({"content": "x"}, index=[1])],
    [tok({"content": "x"}, index="0")],
    [tok({"content": "x"}, index=None)],
    [tok({"content": "x"}, index=2**100)],
    [tok({"content": "x"}), tok({"content": "y"}, index=1.0)],
    [tok({"tool_calls": [{"index": [], "function": {"name": "f"}}]})],
    [tok({"tool_calls": [{"index": 0}, {"index": "x"}]})],
], ids=str)
def test_a_worker_answer_of_another_shape_is_a_protocol_error(route: str, events: list[dict[str, Any]]) -> None:
    for typed in (True, False):
        (outcome, *_), _ = build(route, events, typed)
        if route == "completion" and "tool_calls" in str(events):
            assert isinstance(outcome, dict)  # a completion's answer has no tool calls to read
        else:
            assert outcome[:2] == ("UpstreamProtocolError", 502)


@pytest.mark.parametrize("events", [
    [tok(7)], [tok("x")], [tok({"tool_calls": [{"function": 3}]})], [tok({"tool_calls": 5})],
    [tok({"tool_calls": [7, {"function": {"name": "f", "arguments": 1}}]})],
], ids=str)
def test_odd_deltas_are_read_as_nothing(events: list[dict[str, Any]]) -> None:
    (doc, *_), _ = build("chat", events, typed=True)
    assert isinstance(doc, dict) and doc["choices"][0]["message"]["content"] in ("", None)


@pytest.mark.parametrize("payload", [
    orjson.dumps({**tok({"content": "x"}, finish_reason="stop"), "service_tier": "s"}),  # unknown field, last
    orjson.dumps({**usage(), **tok({"content": "x"}, stop_reason=2**64 - 1)}),
    b'{"id": "a", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"a": 1}, "model": 5}',
    b'{"id": "a", "choices": [{"index": 0, "delta": {"content": "\xff"}}]}', b'{"id": "a", ',
])
def test_take_adds_nothing_when_it_declines(payload: bytes) -> None:
    agg = StreamAggregator("chat")
    with pytest.raises((msgspec.DecodeError, UnicodeDecodeError)):
        agg.take(payload)
    assert agg.head == {} and agg.choices == {} and agg.usage is None and agg.extra == {}
    with pytest.raises(UpstreamProtocolError):
        agg.result()


def _deep(levels: int) -> Any:
    out: Any = 0
    for _ in range(levels):
        out = [out]
    return out


@pytest.mark.parametrize("typed", [True, False])
def test_an_error_event_nested_deeper_than_can_be_written_is_still_the_workers_error(typed: bool) -> None:
    (outcome, *_), _ = build("chat", [tok({"content": "x"}), {"error": {"message": "m", "code": _deep(300)}}],
                             typed)
    assert outcome == ("UpstreamStatus", 500, "worker answered HTTP 500")
    (outcome, *_), _ = build("chat", [tok({"content": "x"}), {"error": {"message": "m", "code": 400,
                                                                       "x": _deep(300)}}], typed)
    assert outcome == ("UpstreamStatus", 400, "worker answered HTTP 400")
