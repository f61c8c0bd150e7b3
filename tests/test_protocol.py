from __future__ import annotations

import orjson
import pytest

from app.errors import InvalidRequest
from app.protocol import parse_request, set_max_tokens, upstream_body, usage_counts

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def raw(doc: object) -> bytes:
    return orjson.dumps(doc)


def test_stream_is_the_default_and_usage_is_requested_upstream() -> None:
    req = parse_request("chat", raw(CHAT))
    assert req.stream is True and req.include_usage is False and req.max_tokens is None
    sent = orjson.loads(upstream_body(req))
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_non_streaming_clients_still_get_a_streaming_worker_request() -> None:
    req = parse_request("chat", raw({**CHAT, "stream": False}))
    assert req.stream is False and req.upstream_stream is True
    sent = orjson.loads(upstream_body(req))
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_beam_search_is_not_streamed_upstream() -> None:
    req = parse_request("completions", raw({"model": "m", "prompt": "x", "stream": False, "use_beam_search": True}))
    sent = orjson.loads(upstream_body(req))
    assert sent["stream"] is False and "stream_options" not in sent


def test_stream_options_without_a_stream_are_refused_as_openai_and_vllm_refuse_them() -> None:
    for route, body in (("chat", {"messages": [{"role": "user", "content": "x"}]}), ("completions", {"prompt": "x"})):
        unstreamed = {"model": "m", **body, "stream": False}
        with pytest.raises(InvalidRequest) as info:
            parse_request(route, raw({**unstreamed, "stream_options": {"include_usage": True}}))
        assert info.value.param == "stream_options" and "only allowed when 'stream' is enabled" in info.value.message
        for empty in (None, {}):  # (vLLM refuses only a non-empty one)
            assert parse_request(route, raw({**unstreamed, "stream_options": empty})).stream is False


@pytest.mark.parametrize(("route", "extra"), [
    ("chat", {"prompt_logprobs": 2}), ("completions", {"prompt_logprobs": 0}),
    ("completions", {"echo": True, "logprobs": 2}),
])
def test_what_a_stream_cannot_carry_is_not_streamed_upstream(route: str, extra: dict[str, object]) -> None:
    """vLLM refuses prompt_logprobs in a stream, and an echoed prompt's logprobs come only unstreamed: a
    non-streaming client gets the worker's own unstreamed answer (a streaming one gets vLLM's own refusal)."""
    base = CHAT if route == "chat" else {"model": "m", "prompt": "x"}
    req = parse_request(route, raw({**base, **extra, "stream": False}))  # type: ignore[arg-type]
    assert req.upstream_stream is False and orjson.loads(upstream_body(req))["stream"] is False
    req = parse_request(route, raw({**base, **extra}))  # type: ignore[arg-type]
    assert req.upstream_stream is True
    assert parse_request("chat", raw({**CHAT, "echo": True, "stream": False})).upstream_stream is True


def test_an_integer_wider_than_64_bits_is_an_integer() -> None:
    """orjson reads it as a float; it is still an integer, far above any cap (clamped or refused as such)."""
    wide = (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": 1000000000000000000000000000000}')
    assert parse_request("chat", wide).max_tokens == 10**30
    nested = wide.replace(b"1000000000000000000000000000000}", b'1e30, "vllm_xargs": {"max_tokens": '
                          b'1000000000000000000000000000000}}')
    with pytest.raises(InvalidRequest):  # a nested field's literal does not vouch for the top-level float
        parse_request("chat", nested)
    for written in (b"1e30", b"1000000000000000000000000000000.0", b"1.5"):
        body = wide.replace(b"1000000000000000000000000000000", written)
        with pytest.raises(InvalidRequest) as err:
            parse_request("chat", body)
        assert err.value.param == "max_tokens" and err.value.error_code == "invalid_type"


def test_continuous_usage_is_not_asked_for_a_client_that_wants_no_usage() -> None:
    opts = {"continuous_usage_stats": True}
    req = parse_request("chat", raw({**CHAT, "stream_options": opts}))
    assert orjson.loads(upstream_body(req))["stream_options"] == {"include_usage": True}
    req = parse_request("chat", raw({**CHAT, "stream_options": {**opts, "include_usage": True}}))
    assert orjson.loads(upstream_body(req))["stream_options"] == {**opts, "include_usage": True}


def test_client_usage_request_is_remembered_and_other_options_kept() -> None:
    req = parse_request("chat", raw({**CHAT, "stream_options": {"include_usage": True, "x": 1}}))
    assert req.include_usage is True
    assert orjson.loads(upstream_body(req))["stream_options"] == {"include_usage": True, "x": 1}


def test_unknown_fields_pass_through() -> None:
    req = parse_request("chat", raw({**CHAT, "top_k": 5, "ignore_eos": True}))
    sent = orjson.loads(upstream_body(req))
    assert sent["top_k"] == 5 and sent["ignore_eos"] is True


def test_max_completion_tokens_wins_and_both_fields_are_rewritten() -> None:
    req = parse_request("chat", raw({**CHAT, "max_tokens": 10, "max_completion_tokens": 20}))
    assert req.max_tokens == 20 and req.max_tokens_param == "max_completion_tokens"
    set_max_tokens(req, 7)
    sent = orjson.loads(upstream_body(req))
    assert sent["max_completion_tokens"] == 7 and sent["max_tokens"] == 7


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({**CHAT, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": -3}, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": 2.5}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": 2.0}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": "5"}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_tokens": True}, "max_tokens", "invalid_type"),
        ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
        ({**CHAT, "n": 0}, "n", "invalid_value"),
        ({**CHAT, "stream": "yes"}, "stream", "invalid_type"),
        ({**CHAT, "stream_options": []}, "stream_options", "invalid_type"),
        ({"messages": CHAT["messages"]}, "model", "invalid_type"),
        ({**CHAT, "model": ""}, "model", "invalid_type"),
        ({**CHAT, "messages": []}, "messages", "invalid_value"),
        ({**CHAT, "messages": "hi"}, "messages", "invalid_type"),
        ({**CHAT, "messages": [{"content": "hi"}]}, "messages[0].role", "invalid_type"),
        ({**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        ({**CHAT, "messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]", "invalid_type"),
    ],
)
def test_chat_validation_errors_name_the_parameter(body: dict[str, object], param: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("chat", raw(body))
    assert err.value.param == param and err.value.error_code == code and err.value.status == 400


@pytest.mark.parametrize("prompt", ["", [], [""], [1, "a"], [[]], [True], {"a": 1}, None, [-1],
                                    [[1, -2]]])  # negative token ids: flat and batched alike (found by fuzzing)
def test_bad_prompts_are_400(prompt: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("completions", raw({"model": "m", "prompt": prompt}))
    assert err.value.param == "prompt"


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_good_prompts(prompt: object) -> None:
    assert parse_request("completions", raw({"model": "m", "prompt": prompt})).route == "completions"


def test_missing_prompt() -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("completions", raw({"model": "m"}))
    assert err.value.error_code == "missing_required_parameter"


@pytest.mark.parametrize("body", [b"", b"{", b"[1,2]", b"null", b'"x"', b"\xff\xfe"])
def test_malformed_json_is_400(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_request("chat", body)
    assert err.value.error_code == "invalid_json" and err.value.param is None


def test_bodies_nested_too_deep_to_forward_are_400() -> None:
    deep = b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "metadata": ' + b"[" * 300 + b"]" * 300
    with pytest.raises(InvalidRequest) as err:
        parse_request("chat", deep + b"}")
    assert err.value.error_code == "invalid_json" and "nested" in err.value.message
    many = {**CHAT, "logit_bias": {str(i): [1] for i in range(500)}}  # many openers, shallow: fine
    assert parse_request("chat", raw(many)).body["logit_bias"]["499"] == [1]


@pytest.mark.parametrize(("usage", "counts"), [
    ({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}, (5, 3)),
    ({"prompt_tokens": 0, "completion_tokens": 0}, (0, 0)),
    ({"prompt_tokens": "5", "completion_tokens": -3}, (None, None)),
    ({"prompt_tokens": 5.0, "completion_tokens": True}, (None, None)),
    ({"completion_tokens": 2}, (None, 2)), ({}, (None, None)), (None, (None, None)), ([5, 3], (None, None)),
    ({"prompt_tokens": 10**15, "completion_tokens": 10**400}, (None, None)),  # would lock a key out for years
    ({"prompt_tokens": 10**8, "completion_tokens": 10**8 + 1}, (10**8, None)),
])
def test_usage_counts_are_non_negative_integers_or_none(usage: object, counts: tuple[int | None, int | None]) -> None:
    assert usage_counts(usage) == counts
