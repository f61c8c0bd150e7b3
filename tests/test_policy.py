"""RequestPolicy: what a request may ask of a worker beyond its shape (unit), and the same refusals through a
running gateway (nothing reaches the worker)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from app.errors import InvalidRequest
from app.policy import DANGEROUS_FIELDS, RequestPolicy, check, check_min_tokens
from app.protocol import parse_request
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi"}


def refused(body: dict[str, Any], policy: RequestPolicy | None = None, route: str = "chat") -> InvalidRequest:
    req = parse_request(route, orjson.dumps(body))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as err:
        check(req, policy or RequestPolicy())
    assert err.value.status == 400
    return err.value


def accepted(body: dict[str, Any], policy: RequestPolicy | None = None, route: str = "chat") -> None:
    check(parse_request(route, orjson.dumps(body)), policy or RequestPolicy())  # type: ignore[arg-type]


@pytest.mark.parametrize("field", DANGEROUS_FIELDS)
def test_fields_that_crashed_or_hijacked_vllm_are_refused_by_default(field: str) -> None:
    value: Any = {"x": 1} if field.endswith("kwargs") else "x" if field != "allowed_token_ids" else [10**9]
    err = refused({**CHAT, field: value})
    assert err.param == field and err.error_code == "parameter_not_allowed"
    accepted({**CHAT, field: value}, RequestPolicy(allow_fields=frozenset({field})))


def test_best_of_is_refused_and_n_is_capped() -> None:
    assert refused({**COMPLETION, "best_of": 2}, route="completions").param == "best_of"
    assert refused({**CHAT, "n": 9}).param == "n"
    accepted({**CHAT, "n": 8})
    assert refused({**CHAT, "n": 3}, RequestPolicy(max_n=2)).param == "n"


@pytest.mark.parametrize(("route", "field"), [("chat", "top_logprobs"), ("chat", "prompt_logprobs"),
                                              ("completions", "logprobs"), ("completions", "prompt_logprobs")])
def test_logprobs_above_the_cap(route: str, field: str) -> None:
    base = CHAT if route == "chat" else COMPLETION
    assert refused({**base, field: 21}, route=route).param == field
    assert refused({**base, field: -1}, route=route).param == field
    assert refused({**base, field: "5"}, route=route).error_code == "invalid_type"
    accepted({**base, field: 20}, route=route)
    assert refused({**base, field: 3}, RequestPolicy(max_logprobs=2), route=route).param == field


def test_chat_logprobs_is_a_boolean_and_passes() -> None:
    accepted({**CHAT, "logprobs": True, "top_logprobs": 5})


def test_unknown_fields_are_refused_unless_allowed() -> None:
    err = refused({**CHAT, "max_tokns": 5})
    assert err.param == "max_tokns" and err.error_code == "unknown_parameter"
    accepted({**CHAT, "max_tokns": 5}, RequestPolicy(allow_unknown_fields=True))
    assert refused({**COMPLETION, "messages": []}, route="completions").param == "messages"
    assert refused({**CHAT, "prompt": "x"}).param == "prompt"


def test_every_parameter_the_openai_sdk_sends_is_known() -> None:
    chat = {**CHAT, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False, "max_completion_tokens": 5,
            "metadata": {}, "modalities": ["text"], "parallel_tool_calls": True, "presence_penalty": 0,
            "reasoning_effort": "low", "response_format": {"type": "text"}, "seed": 1, "service_tier": "auto",
            "stop": ["x"], "store": False, "stream_options": {"include_usage": True}, "temperature": 0,
            "tool_choice": "auto", "tools": [], "top_p": 1, "user": "u", "prompt_cache_key": "k",
            "safety_identifier": "s", "verbosity": "low"}
    accepted(chat)
    accepted({**COMPLETION, "echo": False, "frequency_penalty": 0, "logit_bias": {}, "logprobs": 2,
              "max_tokens": 5, "n": 1, "presence_penalty": 0, "seed": 1, "stop": "x", "suffix": "s",
              "temperature": 0, "top_p": 1, "user": "u"}, route="completions")


def _nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        node = {"type": "object", "properties": {"a": node}}
    return node


def test_schemas_are_checked_for_size_and_depth() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(40)}}
    err = refused({**CHAT, "response_format": fmt})
    assert err.param == "response_format" and err.error_code == "schema_too_deep"
    accepted({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(5)}}})
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    assert refused({**CHAT, "guided_json": big}).error_code == "schema_too_large"
    assert refused({**CHAT, "guided_regex": "a" * 70_000}).error_code == "schema_too_large"
    tool = {"type": "function", "function": {"name": "f", "parameters": _nested(40)}}
    assert refused({**CHAT, "tools": [tool]}).param == "tools"
    assert refused({**CHAT, "tools": {"a": 1}}).error_code == "invalid_type"


def test_a_very_deep_schema_is_refused_without_recursion() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    req = parse_request("chat", orjson.dumps({**CHAT, "guided_choice": ["a"]}))
    req.body["structured_outputs"] = deep  # orjson itself refuses to parse this deep: build it directly
    with pytest.raises(InvalidRequest) as err:
        check(req, RequestPolicy(max_schema_bytes=10**7))
    assert err.value.error_code == "schema_too_deep"


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "https://example.com/a.png",
                                 "HTTP://x", "file:///etc/passwd", "ftp://x/y",
                                 # what URL parsers strip or skip before the scheme: still a URL to fetch
                                 "\thttp://169.254.169.254/x", " http://x", "\x01http://x", "ht\ntps://evil/x.png",
                                 "ht\ttp://x", "//169.254.169.254/x", "s3://bucket/key", ""])
@pytest.mark.parametrize("kind", ["image_url", "audio_url", "video_url"])
def test_remote_media_urls_are_refused(url: str, kind: str) -> None:
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                              {"type": kind, kind: {"url": url}}]}]}
    err = refused(body)
    assert err.param == "messages[0].content[1]" and err.error_code == "remote_media_not_allowed"
    accepted(body, RequestPolicy(allow_remote_media=True))


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "hot"), ("top_p", "x"), ("top_k", "x"), ("seed", 1.5), ("stop", 5), ("stop", ["a", 1]),
    ("logprobs", "yes"), ("logit_bias", [1]), ("tools", [5]), ("tool_choice", 5), ("response_format", "json"),
    ("ignore_eos", "x"), ("stop_token_ids", "x"), ("priority", "x"), ("request_id", 5), ("temperature", True),
])
def test_a_passed_through_field_of_the_wrong_type_is_400(field: str, value: object) -> None:
    err = refused({**CHAT, field: value})
    assert err.param == field and err.error_code == "invalid_type"
    accepted({**CHAT, field: None})  # null: as if absent


def test_right_types_pass() -> None:
    accepted({**CHAT, "temperature": 0, "top_p": 0.9, "top_k": 5, "seed": 7, "stop": ["\n"], "logprobs": True,
              "logit_bias": {"1": -1}, "tool_choice": "auto", "response_format": {"type": "json_object"},
              "ignore_eos": False, "stop_token_ids": [2], "user": "u"})
    req = parse_request("completions", orjson.dumps({"model": "m", "prompt": "x", "logprobs": 2}))
    check(req, RequestPolicy())  # completions' logprobs is a number


def test_inline_media_is_fine() -> None:
    for url in ("data:image/png;base64,iVBORw0KGgo=", " DATA:image/png;base64,iVBORw0KGgo="):
        part = {"type": "image_url", "image_url": {"url": url}}
        accepted({**CHAT, "messages": [{"role": "user", "content": [part]}]})


def test_min_tokens_above_max_tokens_is_400() -> None:
    req = parse_request("chat", orjson.dumps({**CHAT, "min_tokens": 10**9}))
    with pytest.raises(InvalidRequest) as err:
        check_min_tokens(req, 256)
    assert err.value.param == "min_tokens"
    for bad in (-1, "5", 2.5, True):
        with pytest.raises(InvalidRequest):
            check_min_tokens(parse_request("chat", orjson.dumps({**CHAT, "min_tokens": bad})), 256)
    check_min_tokens(parse_request("chat", orjson.dumps({**CHAT, "min_tokens": 256})), 256)


# --- through the gateway: refused before any worker sees it ---------------------------------------------------


@pytest.fixture(scope="module")
def gw() -> Iterator[Any]:
    with ThreadedFakeWorker(record=True) as worker, \
            run_gateway(Settings(upstream=[worker.url], discovery_interval=60.0), ready_timeout=20) as gw:
        gw.worker = worker
        yield gw


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(("raw", "param"), [
    (orjson.dumps({**GOOD, "chat_template": "{{ x }}"}), "chat_template"),
    (orjson.dumps({**GOOD, "prompt_embeds": "AAAA"}), "prompt_embeds"),
    (orjson.dumps({**GOOD, "best_of": 4}), "best_of"),
    (orjson.dumps({**GOOD, "n": 1000}), "n"),
    (orjson.dumps({**GOOD, "top_logprobs": 1000, "logprobs": True}), "top_logprobs"),
    (orjson.dumps({**GOOD, "min_tokens": 10**6}), "min_tokens"),
    (orjson.dumps({**GOOD, "temprature": 0}), "temprature"),
    (orjson.dumps({**GOOD, "messages": []}), "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe bad utf-8"}]}', None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1e400}', None),
    (b'{"model": "tiny", "prompt": "x", "messages": [{"role": "user", "content": "a"}]}', "prompt"),
])
def test_refused_with_an_openai_shaped_400_before_any_worker_call(gw: Any, raw: bytes, param: str | None) -> None:
    before = gw.worker.stats.requests
    r = httpx.post(gw.base + "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    assert gw.worker.stats.requests == before


def test_an_integer_wider_than_64_bits_is_clamped_like_any_other_above_the_cap(gw: Any) -> None:
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 99999999999999999999999}'
    r = httpx.post(gw.base + "/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.headers["x-tokengate-max-tokens-clamped"] == "99999999999999999999999"



def test_empty_prompt_is_400(gw: Any) -> None:
    r = httpx.post(gw.base + "/completions", json={"model": "tiny", "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
