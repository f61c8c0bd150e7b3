"""The SSE parser: events cut at their boundaries, the usage event removed when not asked for, the first token
found, malformed input refused and bounded."""

from __future__ import annotations

import inspect
import sys

import orjson
import pytest

from app.sse import MAX_EVENT_BYTES, SSEParser
from app.upstream import UpstreamProtocolError

from .sse_samples import DONE, ROLE, STREAM, TOK, ev


def feed_all(parser: SSEParser, pieces: list[bytes]) -> bytes:
    return b"".join(parser.feed(p, float(i)) for i, p in enumerate(pieces))


def test_whole_stream_forwarded_untouched_when_usage_was_asked() -> None:
    p = SSEParser(include_usage=True)
    assert p.feed(STREAM, 1.0) == STREAM
    st = p.state
    assert st.saw_done and st.usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert st.content_events == 3 and st.first_token == 1.0


def test_usage_event_is_stripped_when_not_asked_and_done_kept() -> None:
    p = SSEParser(include_usage=False)
    out = p.feed(STREAM, 1.0)
    assert out == ROLE + b"".join(TOK) + DONE
    assert p.state.usage is not None and p.state.saw_done


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_events_split_across_reads_are_reassembled(size: int) -> None:
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    p = SSEParser(include_usage=False)
    out = feed_all(p, pieces)
    assert out == ROLE + b"".join(TOK) + DONE
    assert p.pending == b""
    assert p.state.content_events == 3


def test_output_is_cut_at_event_boundaries_only() -> None:
    p = SSEParser(include_usage=True)
    half = len(ROLE) + 10
    first = p.feed(STREAM[:half], 0.0)
    assert first == ROLE
    assert p.feed(STREAM[half:], 1.0) == STREAM[len(ROLE):]


def test_first_token_is_the_first_content_not_the_role_chunk() -> None:
    p = SSEParser(include_usage=True)
    p.feed(ROLE, 1.0)
    assert p.state.first_token is None
    p.feed(TOK[0], 2.0)
    p.feed(TOK[1], 3.0)
    assert (p.state.first_token, p.state.last_token) == (2.0, 3.0)


def test_completions_text_counts_as_content() -> None:
    p = SSEParser(include_usage=True)
    p.feed(ev({"choices": [{"index": 0, "text": "x"}]}), 4.0)
    assert p.state.first_token == 4.0


def test_crlf_separators_are_accepted() -> None:
    p = SSEParser(include_usage=True)
    out = p.feed(STREAM.replace(b"\n", b"\r\n"), 1.0)
    assert out == STREAM and p.state.saw_done


def test_comments_pass_through() -> None:
    p = SSEParser(include_usage=True)
    assert p.feed(b": keep-alive\n\n" + TOK[0], 1.0) == b": keep-alive\n\n" + TOK[0]


def test_worker_error_event_is_forwarded_and_remembered() -> None:
    err = ev({"error": {"message": "boom", "type": "x", "param": None, "code": 500}})
    p = SSEParser(include_usage=False)
    assert p.feed(err, 1.0) == err
    assert p.state.saw_error


@pytest.mark.parametrize("bad", [b"data: {not json}\n\n", b"garbage line\n\n", b"data: [1,2]\n\n"])
def test_malformed_events_raise(bad: bytes) -> None:
    p = SSEParser(include_usage=True)
    with pytest.raises(UpstreamProtocolError):
        p.feed(TOK[0] + bad, 1.0)


def test_an_event_that_never_ends_is_bounded() -> None:
    p = SSEParser(include_usage=True)
    p.feed(b"data: {", 0.0)
    with pytest.raises(UpstreamProtocolError):
        for _ in range(5):
            p.feed(b"x" * (1024 * 1024), 0.0)


def test_extra_empty_lines_between_events_are_valid_sse() -> None:
    # found by fuzzing: "\n\n\n" split an event as "\ndata: ...", refused as malformed — but only when the
    # extra line end arrived in the same read as the next event
    stream = TOK[0] + b"\n" + TOK[1] + b"\r\n\r\n" + DONE
    whole = SSEParser(include_usage=True)
    assert whole.feed(stream, 1.0) == stream.replace(b"\r\n", b"\n")
    split = SSEParser(include_usage=True)
    cut = len(TOK[0]) + 1
    feed_all(split, [stream[:cut], stream[cut:]])
    for p in (whole, split):
        assert p.state.content_events == 2 and p.state.saw_done


def test_what_stays_pending_is_bounded_after_complete_events_too() -> None:
    # found by fuzzing: the limit was checked only for chunks without an event boundary
    p = SSEParser(include_usage=True)
    with pytest.raises(UpstreamProtocolError):
        p.feed(TOK[0] + b"data: {" + b"x" * MAX_EVENT_BYTES, 0.0)
    assert len(p.pending) <= MAX_EVENT_BYTES


def _event(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


CHUNK_SHAPES = [
    {"choices": [{"index": 0, "delta": {"content": " tok"}}]},
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
    {"choices": [{"index": 0, "text": " t", "logprobs": None}]},
    {"choices": [{"index": 0, "text": ""}]},
    {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]},
    {"choices": [{"index": 0, "delta": {"reasoning": "hm"}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]}}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": []}}]},
    {"choices": [{"index": 0, "delta": {"content": "\"content\":\"x"}}]},  # looks like a key, is a value
    {"choices": [{"index": 0, "delta": {"content": None},
                  "logprobs": {"content": [{"token": "a", "logprob": -1.0}]}}]},
    {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
]


@pytest.mark.parametrize("shape", CHUNK_SHAPES)
def test_the_fast_path_after_the_first_token_sees_what_a_full_parse_sees(shape: dict[str, object]) -> None:
    stream = _event({"choices": [{"index": 0, "delta": {"content": "first"}}]}) + _event(shape) * 3
    fast, full = SSEParser(include_usage=False), SSEParser(include_usage=False, sink=lambda obj: None)
    assert fast.feed(stream, 1.0) == full.feed(stream, 1.0)
    assert fast.state.content_events == full.state.content_events
    assert fast.state.usage == full.state.usage and fast.state.last_token == full.state.last_token


@pytest.mark.parametrize("bad", [b'data: {"id": "broken", not json\n\n', b"data: [1, 2]\n\n", b'data: "x"\n\n'])
def test_invalid_json_after_the_first_token_is_still_an_error(bad: bytes) -> None:
    parser = SSEParser(include_usage=False)
    parser.feed(_event({"choices": [{"index": 0, "delta": {"content": "first"}}]}), 1.0)
    with pytest.raises(UpstreamProtocolError):
        parser.feed(bad, 2.0)


def test_an_event_nested_past_the_typed_decoders_depth_is_read_the_general_way() -> None:
    """msgspec's depth is Python's recursion limit; running out of it is not a malformed event (orjson, with its
    own limit of 1024 levels, reads this one)."""
    event = b'data: {"x":' + b"[" * 300 + b"]" * 300 + b',"choices":[{"text":"x"}]}\n\n'
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 100)  # less depth than the event needs
    try:
        parser = SSEParser(False)
        out = parser.feed(event, 1.0)
    finally:
        sys.setrecursionlimit(limit)
    assert out == event and parser.state.content_events == 1
