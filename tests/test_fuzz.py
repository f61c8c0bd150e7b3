"""Property fuzzing of the parts that read untrusted bytes: the SSE parser (worker bytes), the request validator
(client bytes), and the whole HTTP surface through its OpenAPI schema (schemathesis against a gateway in front of
a fake worker). A fixed, small budget: the file runs in well under a minute on 2 cores; TOKENGATE_FUZZ_SCALE=N
multiplies every property's examples for a longer hunt."""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from app import sse
from app.aggregate import StreamAggregator
from app.caps import Caps, Decision, PromptSize, decide
from app.errors import GatewayError, InvalidRequest
from app.policy import DANGEROUS_FIELDS, KNOWN_FIELDS, RequestPolicy, check, check_min_tokens
from app.protocol import ParsedRequest, Route, parse_request, set_max_tokens, upstream_body
from app.settings import Settings
from app.sse import SSEParser
from app.upstream import UpstreamProtocolError
from bench.fakeworker import ThreadedFakeWorker

from .utils import RunningGateway, run_gateway

SCALE = float(os.environ.get("TOKENGATE_FUZZ_SCALE", "1"))  # e.g. 50 for a longer hunt; 1 keeps the file < 60 s


def fuzz(examples: int) -> settings:
    """A fixed budget per property: the file is part of the regular suite."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------------
# SSE parser: worker bytes, split anywhere
# ---------------------------------------------------------------------------------------------------------------

_words = st.text(max_size=12)  # any unicode (no lone surrogates: a worker's JSON is valid UTF-8)
_USAGE = st.fixed_dictionaries({"prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.integers(0, 10**6)})
# (event object, does it carry content the parser counts)
_content = st.one_of(
    _words.map(lambda t: ({"choices": [{"index": 0, "delta": {"content": t}}]}, bool(t))),
    _words.map(lambda t: ({"choices": [{"index": 0, "text": t, "logprobs": None}]}, bool(t))),
    _words.map(lambda t: ({"choices": [{"index": 0, "delta": {"reasoning_content": t}}]}, bool(t))),
    st.just(({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, False)),
    st.just(({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1"}]}}]}, True)),
    st.just(({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, False)),
    _USAGE.map(lambda u: ({"choices": [{"index": 0, "text": "x"}], "usage": u}, True)),  # usage with choices: kept
    st.just(({"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}}, False)),
)
_FIELD_LINES = st.sampled_from([b": keep-alive", b":", b"event: message", b"id: 7", b"retry: 1000"])


@dataclass(frozen=True)
class Stream:
    sent: list[bytes]  # the events, one line each, without separators
    kept: list[bytes]  # what a client that did not ask for usage must get
    raw: bytes  # the events with their separators, as a worker sends them
    content: int  # events with content the parser must count
    usage: dict[str, Any] | None  # the last usage seen
    done: bool  # ends with [DONE] (passed on)


@st.composite
def sse_streams(draw: st.DrawFn, *, crlf: bool = False, blank_lines: bool = False) -> Stream:
    """A valid stream. Separators are two line ends, each LF or (``crlf``) CRLF, and with ``blank_lines`` extra
    empty lines (valid SSE: an empty line dispatches nothing). An error event ends what is passed on: what the
    worker sends after it (vLLM: ``[DONE]``) is not."""
    lines: list[bytes] = []
    sent: list[bytes] = []
    kept: list[bytes] = []
    content = 0
    usage: dict[str, Any] | None = None
    failed = False
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["data", "data", "data", "usage", "field"]))
        has = False
        obj: dict[str, Any] = {}
        if kind == "field":
            line = draw(_FIELD_LINES)
        else:
            prefix = draw(st.sampled_from([b"data: ", b"data:"]))
            if kind == "usage":
                obj = {"id": "x", "choices": [], "usage": draw(_USAGE)}
            else:
                obj, has = draw(_content)
            line = prefix + orjson.dumps(obj)
        lines.append(line)
        if failed:
            continue
        content += has
        if "usage" in obj:
            usage = obj["usage"]
        sent.append(line)
        if kind != "usage":
            kept.append(line)
        failed = "error" in obj
    done = draw(st.booleans())
    if done:
        lines.append(b"data: [DONE]")
        if not failed:
            sent.append(b"data: [DONE]")
            kept.append(b"data: [DONE]")
    done = done and not failed
    ends = st.sampled_from([b"\n", b"\r\n"]) if crlf else st.just(b"\n")
    raw = []
    for line in lines:
        extra = draw(st.integers(0, 2)) if blank_lines else 0
        raw.append(line + b"".join(draw(ends) for _ in range(2 + extra)))
    return Stream(sent, kept, b"".join(raw), content, usage, done)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _events(forwarded: bytes) -> list[bytes]:
    return [e for e in re.split(rb"\n\n+", forwarded.strip(b"\n")) if e]


def _feed(parser: SSEParser, pieces: list[bytes]) -> bytes:
    return b"".join(parser.feed(p, float(i)) for i, p in enumerate(pieces))


_framing = st.tuples(st.booleans(), st.booleans()).flatmap(
    lambda f: st.tuples(st.just(f[1]), sse_streams(crlf=f[0], blank_lines=f[1])))


@fuzz(300)
@given(framed=_framing, include_usage=st.booleans(), cuts=st.lists(st.integers(0, 10**4), max_size=12))
def test_sse_any_split_forwards_what_one_piece_does(framed: tuple[bool, Stream], include_usage: bool,
                                                    cuts: list[int]) -> None:
    blank_lines, s = framed
    objs_whole: list[dict[str, Any]] = []
    objs_split: list[dict[str, Any]] = []
    whole = SSEParser(include_usage, sink=objs_whole.append)
    out_whole = whole.feed(s.raw, 0.0)
    split = SSEParser(include_usage, sink=objs_split.append)
    out_split = _feed(split, _cut(s.raw, cuts))

    # the events a client gets: the usage event nobody asked for is the only thing ever removed
    expected = s.sent if include_usage else s.kept
    assert _events(out_split) == _events(out_whole) == expected
    if not blank_lines:  # and the bytes themselves, once CRLF is read as LF, are untouched
        assert out_whole == out_split == b"".join(e + b"\n\n" for e in expected)
    for p in (whole, split):
        state = p.state
        assert p.pending.strip(b"\n") == b""  # at most a trailing empty line, which dispatches nothing
        assert (state.content_events, state.saw_done, state.usage) == (s.content, s.done, s.usage)
        assert (state.first_token is None) == (s.content == 0) == (state.last_token is None)
        if state.first_token is not None and state.last_token is not None:
            assert state.first_token <= state.last_token
    assert whole.state.saw_error == split.state.saw_error
    assert objs_whole == objs_split


_garbage_lines = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"data: ", b"data:", b"data: [DONE]", b": c", b"event: x", b"", b"\r", b"\n", b"\r\n",
                     b"data: {", b"data: []", b"data: null", b'data: {"usage": 5}', b'data: {"choices": 3}',
                     b'data: {"choices": [1, null, {"delta": 7}]}', b'data: {"usage": {}, "choices": {}}',
                     b"data: " + b"[" * 2000, b"data: \xff\xfe", b'data: "\\ud800"', b"data: 1e999"]),
    st.text(max_size=20).map(lambda t: b"data: " + t.encode("utf-8", "surrogatepass")),
)


@fuzz(300)
@given(lines=st.lists(st.tuples(_garbage_lines, st.sampled_from([b"", b"\n", b"\n\n", b"\r\n\r\n"])), max_size=12),
       cuts=st.lists(st.integers(0, 10**4), max_size=10), limit=st.sampled_from([16, 64, 4096]),
       include_usage=st.booleans())
def test_sse_garbage_raises_only_protocol_errors_and_stays_bounded(
    lines: list[tuple[bytes, bytes]], cuts: list[int], limit: int, include_usage: bool
) -> None:
    raw = b"".join(line + sep for line, sep in lines)
    parser = SSEParser(include_usage, sink=lambda obj: None)
    with mock.patch.object(sse, "MAX_EVENT_BYTES", limit):
        for i, piece in enumerate(_cut(raw, cuts)):
            try:
                out = parser.feed(piece, float(i))
            except UpstreamProtocolError as exc:
                assert exc.status == 502 and exc.error_code == "bad_worker_response"
                return  # the relay ends the stream here
            assert out == b"" or out.endswith(b"\n\n")
            assert len(parser.pending) <= limit


# Events whose fields the relay reads (choices, text, delta, usage, error) hold anything JSON can: the typed fast
# path (no sink) must reach exactly what the general path (a sink: every object built) does, or fall back to it.
_anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),  # (orjson reads wider ints as floats)
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_delta = st.one_of(_anything, st.fixed_dictionaries({}, optional={
    k: st.one_of(st.text(max_size=4), _anything) for k in ("content", "reasoning_content", "reasoning", "tool_calls",
                                                           "role")}))
_choice = st.one_of(_anything, st.fixed_dictionaries({"index": st.integers(0, 3)}, optional={
    "text": st.one_of(st.text(max_size=4), _anything), "delta": _delta, "finish_reason": _anything}))
_event_obj = st.one_of(_anything, st.fixed_dictionaries({"id": st.text(max_size=6)}, optional={
    "choices": st.one_of(st.lists(_choice, max_size=3), _anything), "usage": st.one_of(_USAGE, _anything),
    "error": _anything, "model": _anything}))


def _event_bytes(obj: Any, ascii_only: bool) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=ascii_only).encode()


_raw_events = st.one_of(
    st.tuples(_event_obj, st.booleans()).map(lambda t: _event_bytes(*t)),
    st.sampled_from([b'data: {"id":"\xff","choices":[]}',  # not UTF-8, in a skipped field
                     b'data: {"id":"a\xc3","choices":[{"text":"x"}]}',
                     b'data: {"choices":[{"text":"x"}],"choices":[]}', b'data: {"usage":{"a":1},"usage":null}',
                     b'data: {"choices":[{"text":"x"}]} junk', b'data: {"choices":[{"text":"x"}]', b"data: {}",
                     b'data: {"error":null}', b'data: {"choices":[{"delta":null,"text":""}]}',
                     *(b'data: {"choices":[{"delta":{"%s":"t"}}]}' % k.encode()
                       for k in ("content", "reasoning_content", "reasoning", "tool_calls", "role")),
                     b'data: {"choices":[],"usage":{"prompt_tokens":1}}',
                     b'data: {"x":' + b"[" * 900 + b"]" * 900 + b',"choices":[{"text":"x"}]}']),
)


@fuzz(400)
@given(events=st.lists(_raw_events, min_size=1, max_size=6), include_usage=st.booleans(), one_by_one=st.booleans())
def test_sse_typed_fast_path_agrees_with_the_general_path(events: list[bytes], include_usage: bool,
                                                           one_by_one: bool) -> None:
    raw = [e + b"\n\n" for e in events]
    pieces = raw if one_by_one else [b"".join(raw)]

    def run(parser: SSEParser) -> tuple[bytes, Any]:
        out = []
        for i, piece in enumerate(pieces):
            try:
                out.append(parser.feed(piece, float(i)))
            except UpstreamProtocolError as exc:
                return b"".join(out), str(exc)
        st_ = parser.state
        return b"".join(out), (st_.first_token, st_.last_token, st_.usage, st_.content_events, st_.saw_done,
                               st_.saw_error)

    assert run(SSEParser(include_usage)) == run(SSEParser(include_usage, sink=lambda obj: None))


# The non-streaming aggregator's typed way (``StreamAggregator.take``) against its general way (``add``): events
# near vLLM's shape, each field now and then of another type or value, unknown fields added.
_maybe = st.one_of(st.none(), st.text(max_size=5), st.integers(-3, 3), st.just(2**63), st.just(2**64 - 1),
                   st.just(1.5), st.just([]), st.just({}), st.just([1]), st.just({"a": None}), st.booleans())


def _agg_events(odd: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Events as vLLM writes them; with ``odd``, any field now and then of another type or value, or unknown."""
    def near(typical: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(*[typical] * 6, _maybe) if odd else typical

    def plus(clean: st.SearchStrategy[dict[str, Any]], *keys: str, top: bool = False) -> st.SearchStrategy[Any]:
        if not odd:
            return clean
        unknown = st.tuples(clean, st.sampled_from(keys), _maybe).map(lambda t: {**t[0], t[1]: t[2]})
        return st.one_of(*[clean] * 6, unknown) if top else st.one_of(*[clean] * 6, unknown, _maybe)

    delta = plus(st.fixed_dictionaries({"content": near(st.sampled_from(["", "a", " b"]))}, optional={
        "role": near(st.sampled_from(["assistant", ""])),
        "reasoning": near(st.text(max_size=3)), "reasoning_content": near(st.text(max_size=3)),
        **({"tool_calls": st.lists(st.fixed_dictionaries({"index": st.integers(0, 2)}, optional={
            "id": st.text(max_size=3), "type": st.just("function"),
            "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=3),
                                                            "arguments": st.text(max_size=3)})}), max_size=2)}
           if odd else {})}), "other")
    choice = plus(st.fixed_dictionaries({"index": near(st.integers(0, 1))}, optional={
        "delta": near(delta), "text": near(st.sampled_from(["", "a", " b"])),
        "logprobs": st.none() | st.fixed_dictionaries({"content": st.lists(st.integers(), max_size=2)})
        if odd else st.none(),
        "finish_reason": near(st.sampled_from([None, "stop", "length"])),
        "stop_reason": near(st.one_of(st.none(), st.integers(0, 2), st.just("x"))),
        "token_ids": near(st.none()), "prompt_token_ids": near(st.none())}), "matched_stop", "text")
    usage = st.fixed_dictionaries({"prompt_tokens": near(st.integers(0, 99)), "completion_tokens": st.integers(0, 99)},
                                  optional={"prompt_tokens_details": near(st.fixed_dictionaries(
                                      {"cached_tokens": st.integers(0, 9)}))})
    return plus(st.fixed_dictionaries({"choices": near(st.lists(choice, min_size=1, max_size=2) | st.just([]))},
                                      optional={
        "id": near(st.just("chatcmpl-1")), "object": near(st.just("chat.completion.chunk")),
        "created": near(st.integers(0, 2**40)), "model": near(st.just("tiny")), "usage": near(st.none() | usage),
        "system_fingerprint": near(st.none() | st.just("fp")), "prompt_token_ids": near(st.none()),
        "prompt_text": near(st.none())}), "error", "service_tier", top=True)


_agg_event = st.one_of(_agg_events(odd=False), _agg_events(odd=False), _agg_events(odd=True))


@fuzz(400)
@given(events=st.lists(_agg_event, min_size=1, max_size=6), route=st.sampled_from(["chat", "completion"]),
       include_usage=st.booleans())
def test_aggregator_typed_way_builds_what_the_general_way_does(events: list[dict[str, Any]], route: str,
                                                               include_usage: bool) -> None:
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)

    def run(typed: bool) -> Any:
        agg = StreamAggregator(route)
        parser = SSEParser(include_usage, sink=agg.add, take=agg.take if typed else None)
        try:
            out = parser.feed(raw, 1.0)
            doc = agg.result()
        except GatewayError as exc:
            return type(exc), exc.status, str(exc)
        st_ = parser.state
        return out, orjson.dumps(doc), (st_.first_token, st_.usage, st_.content_events, st_.saw_error)

    assert run(True) == run(False)


@fuzz(100)
@given(s=sse_streams(), include_usage=st.booleans(), size=st.integers(1, 64))
def test_sse_crlf_stream_parses_like_lf(s: Stream, include_usage: bool, size: int) -> None:
    lf = b"".join(e + b"\n\n" for e in s.sent)
    crlf = lf.replace(b"\n", b"\r\n")
    a, b = SSEParser(include_usage), SSEParser(include_usage)
    out_lf = _feed(a, [lf[i:i + size] for i in range(0, len(lf), size)])
    out_crlf = _feed(b, [crlf[i:i + size] for i in range(0, len(crlf), size)])  # cuts between \r and \n too
    assert out_lf == out_crlf
    assert (a.state.content_events, a.state.saw_done, a.state.usage) == \
        (b.state.content_events, b.state.saw_done, b.state.usage)


# ---------------------------------------------------------------------------------------------------------------
# Request validation: client bytes → parse_request → policy → caps → the worker's body
# ---------------------------------------------------------------------------------------------------------------

_keys = st.text(max_size=8)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
                     max_leaves=16)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any] = _json) -> st.SearchStrategy[Any]:
    """``good`` seven times in eight: enough well-shaped values that every later check is reached."""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)  # shrinks towards good


_count = mostly(st.integers(0, 30), st.one_of(st.integers(-(2**65), 2**65), st.floats(-2.0, 50.0), st.booleans(),
                                              st.text(max_size=3)))
_url = st.sampled_from(["http://10.0.0.1/a.png", "HTTPS://x", "file:///etc/passwd", "ftp://h/x",
                        "data:image/png;base64,AA", "", "javascript:1"])
_part = mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
    st.sampled_from(["image_url", "audio_url", "video_url", "input_audio", "file", "x"]).flatmap(
        lambda t: st.fixed_dictionaries({"type": st.just(t)},
                                        optional={t: st.one_of(_url, st.fixed_dictionaries({"url": _url}), _json)})),
))
_message = mostly(st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "system", "assistant", "tool"]), st.sampled_from(["", 1, None]))},
    optional={"content": mostly(st.text(max_size=20) | st.lists(_part, max_size=3))},
))
_prompt = mostly(st.one_of(st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=5), min_size=1,
                                                                           max_size=3),
                           st.lists(st.integers(0, 2**40), min_size=1, max_size=4),
                           st.lists(st.lists(st.integers(0, 10), min_size=1, max_size=3), min_size=1, max_size=3)),
                 st.one_of(_json, st.lists(st.lists(st.integers(-2, 10) | st.booleans(), max_size=3), max_size=3)))
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "stream": mostly(st.booleans() | st.none()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans()),
                                                                 "continuous_usage_stats": st.booleans()})),
    "max_tokens": _count, "max_completion_tokens": _count, "n": _count, "min_tokens": _count,
    "logprobs": _count, "top_logprobs": _count, "prompt_logprobs": _count, "best_of": mostly(st.none(), _count),
    "use_beam_search": st.booleans(),
    "tools": mostly(st.lists(_json, max_size=3)),
    **{k: _json for k in ("response_format", "guided_json", "guided_regex", "guided_grammar", "structured_outputs",
                          "temperature", "stop", "logit_bias", "metadata", "tool_choice")},
    **{k: mostly(st.none(), _json) for k in DANGEROUS_FIELDS},
}


@st.composite
def request_bodies(draw: st.DrawFn, route: Route) -> dict[str, Any]:
    """Mostly-plausible bodies for ``route``: the right shapes often, anything at all sometimes, so that every
    check is reached."""
    body: dict[str, Any] = {"model": draw(mostly(st.text(min_size=1, max_size=8)))}
    if route == "chat" or draw(st.integers(0, 9)) == 9:
        body["messages"] = draw(mostly(st.lists(_message, min_size=1, max_size=3)))
    if route == "completions" or draw(st.integers(0, 9)) == 9:
        body["prompt"] = draw(_prompt)
    for name in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=5, unique=True)):
        body[name] = draw(_FIELDS[name])
    for name in draw(st.lists(mostly(st.sampled_from(sorted(KNOWN_FIELDS[route])), _keys), max_size=2)):
        body.setdefault(name, draw(_json))
    return body


def _encode(ascii_only: bool, value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def raw_bodies(route: Route) -> st.SearchStrategy[bytes]:
    return mostly(st.builds(_encode, st.booleans(), request_bodies(route)), st.one_of(
        st.builds(_encode, st.booleans(), _json),
        st.builds(_encode, st.just(True), st.text(st.characters(categories=["Cs", "L"]), max_size=4)),
        st.binary(max_size=64),
        st.builds(lambda body, junk: _encode(True, body)[:-1] + junk, request_bodies(route), st.binary(max_size=4)),
    ))


ROUTES: list[Route] = ["chat", "completions"]
_routed = st.sampled_from(ROUTES).flatmap(lambda r: st.tuples(st.just(r), raw_bodies(r)))
_policies = st.builds(
    RequestPolicy, max_n=st.integers(1, 16), max_logprobs=st.integers(0, 30),
    allow_fields=st.frozensets(st.sampled_from(DANGEROUS_FIELDS)), allow_unknown_fields=st.booleans(),
    allow_remote_media=st.booleans(), max_schema_bytes=st.integers(1, 4096), max_schema_depth=st.integers(1, 40),
)


@st.composite
def caps_and_prompts(draw: st.DrawFn) -> tuple[Caps, PromptSize, int]:
    window = draw(mostly(st.integers(512, 8192), st.integers(1, 8192)))
    caps = Caps.build(model_max_len=window, context_cap=draw(st.none() | st.integers(1, 10000)),
                      max_tokens_cap=draw(st.none() | st.integers(1, 5000)),
                      default_max_tokens=draw(st.none() | st.integers(1, 5000)),
                      policy=draw(st.sampled_from(["clamp", "reject"])))
    n: int = draw(mostly(st.integers(0, 300), st.integers(0, 9000)))
    bound = draw(st.none() | st.integers(n, n + 9000))  # an upper bound, as counting.py promises

    async def exact() -> int:
        return n

    return caps, PromptSize(bound, exact), n


def _run(coro: Coroutine[Any, Any, Decision]) -> Decision:
    """decide() awaits nothing here (the exact count is ready): drive it without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("decide() suspended")


def _assert_openai_400(exc: InvalidRequest) -> None:
    assert exc.status == 400
    err = orjson.loads(exc.body())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] is None or isinstance(err["param"], str)


def _accept(route: Route, raw: bytes, policy: RequestPolicy, capsp: tuple[Caps, PromptSize, int]) -> None:
    req = parse_request(route, raw)
    assert isinstance(req, ParsedRequest) and isinstance(req.body, dict)
    assert isinstance(req.model, str) and req.model and req.n >= 1
    assert req.max_tokens is None or (type(req.max_tokens) is int and req.max_tokens >= 1)
    check(req, policy)
    caps, prompt, n_prompt = capsp
    assert 1 <= caps.default_max_tokens <= caps.max_tokens_cap <= caps.context_cap <= caps.model_max_len
    d = _run(decide(caps, req.max_tokens, req.max_tokens_param, prompt, prompt_param="messages", model=req.model))
    assert type(d.max_tokens) is int and 1 <= d.max_tokens <= caps.max_tokens_cap
    if d.prompt_tokens is not None:
        assert d.prompt_tokens == n_prompt < caps.model_max_len
        assert n_prompt + d.max_tokens <= max(caps.context_cap, n_prompt + 1)
    if d.clamped_from is not None:
        assert d.clamped_from == req.max_tokens and d.clamped_from > d.max_tokens
    set_max_tokens(req, d.max_tokens)
    check_min_tokens(req, d.max_tokens)
    sent = orjson.loads(upstream_body(req))
    assert isinstance(sent, dict) and sent["stream"] is req.upstream_stream and sent["model"] == req.model
    param = "max_completion_tokens" if route == "chat" and "max_completion_tokens" in sent else "max_tokens"
    assert type(sent[param]) is int and sent[param] == d.max_tokens >= 1
    if req.upstream_stream:
        assert sent["stream_options"]["include_usage"] is True
    else:
        assert "stream_options" not in sent


@fuzz(400)
@given(routed=_routed, policy=_policies, capsp=caps_and_prompts())
def test_request_validation_accepts_or_says_400_never_anything_else(
    routed: tuple[Route, bytes], policy: RequestPolicy, capsp: tuple[Caps, PromptSize, int]
) -> None:
    route, raw = routed
    try:
        _accept(route, raw, policy, capsp)
    except InvalidRequest as exc:  # ContextLengthExceeded and MaxTokensExceeded are InvalidRequests too
        _assert_openai_400(exc)


@fuzz(150)
@given(route=st.sampled_from(ROUTES), data=st.data(), policy=_policies)
def test_accepted_request_survives_a_second_pass(route: Route, data: st.DataObject, policy: RequestPolicy) -> None:
    """What the gateway sends the worker is itself a body it would accept (nothing half-rewritten)."""
    body = data.draw(request_bodies(route))
    try:
        req = parse_request(route, _encode(True, body))
        check(req, policy)
    except InvalidRequest:
        return
    again = parse_request(req.route, upstream_body(req))
    assert (again.model, again.n, again.max_tokens) == (req.model, req.n, req.max_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The HTTP surface, from /openapi.json: schemathesis against a gateway in front of a fake worker
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with ThreadedFakeWorker() as worker, run_gateway(
        Settings(upstream=[worker.url], discovery_interval=60, read_timeout=10, stream_idle_timeout=10),
        ready_timeout=20,
    ) as gw:
        yield gw


GENERATION = {"POST /v1/chat/completions", "POST /v1/completions"}


def _check_response(case: schemathesis.Case[Any], session: requests.Session) -> None:
    body = case.body
    if isinstance(body, dict) and isinstance(model := body.get("model"), str) and \
            zlib.crc32(model.encode("utf-8", "surrogatepass")) % 4:
        body["model"] = "tiny"  # most generated requests get past the model lookup: the fake worker's model
    response = case.call(session=session, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if 400 <= response.status_code < 500:
        err = orjson.loads(response.content)["error"]
        assert set(err) == {"message", "type", "param", "code"}, response.content
        assert isinstance(err["message"], str) and isinstance(err["type"], str), response.content


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_api_never_5xx_and_every_4xx_is_openai_shaped(gateway: RunningGateway, mode: GenerationMode) -> None:
    """Every operation in the served /openapi.json, the pure-ASGI generation routes included. (schemathesis'
    pytest loader, ``from_fixture``, reads a pytest internal that pytest 9 removed: its strategies are used
    directly.)"""
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    operations = [op for methods in schema.values() for op in methods.values()]
    assert GENERATION <= {op.label for op in operations}
    with requests.Session() as session:
        for op in operations:
            if not mode.is_positive and not (op.body or any(op.iter_parameters())):
                continue  # nothing to get wrong
            examples = 50 if op.label in GENERATION else 10

            @fuzz(examples)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case[Any]) -> None:
                _check_response(case, session)

            run()


def test_undocumented_methods_are_openai_shaped_405s(gateway: RunningGateway) -> None:
    """What schemathesis' coverage phase would add (methods the schema doesn't list), deterministically."""
    paths = orjson.loads(requests.get(gateway.url + "/openapi.json", timeout=10).content)["paths"]
    with requests.Session() as session:
        for path, item in paths.items():
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - {m.upper() for m in item}:
                r = session.request(method, gateway.url + path.replace("{name}", "x"), timeout=10)
                assert r.status_code == 405, (method, path, r.status_code)
                assert orjson.loads(r.content)["error"]["code"] == "method_not_allowed"

