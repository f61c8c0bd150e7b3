"""What a request may ask of a worker, beyond its shape: fields that have crashed or hijacked vLLM, expensive
sampling options, oversized schemas, remote media. Checked after parsing, before any tokenisation or routing.

Refused by default, each with a clear 400 naming the parameter (vLLM advisories CVE-2024-8768, CVE-2024-8939,
CVE-2025-48942/48943/48944, CVE-2025-61620, CVE-2025-62426, GHSA-4xqp-c3mv-qff7, CVE-2026-24779 are about
exactly these inputs):
- template and processor hooks (``chat_template``, ``chat_template_kwargs``, ``mm_processor_kwargs``),
  ``prompt_embeds`` (tensors deserialised by the worker), ``allowed_token_ids`` (out-of-range ids crashed the
  engine), ``cache_salt`` (lets a client steer the shared prefix cache) — unless listed in ``allow_fields``;
- ``best_of`` (n-fold work), ``n`` above a cap, ``logprobs``/``top_logprobs``/``prompt_logprobs`` above a cap;
- JSON schemas, regexes and grammars (``response_format``, ``guided_*``, ``structured_outputs``, tool
  ``parameters``) larger or deeper than a limit;
- media URLs other than inline ``data:`` in image/audio/video parts: the worker would fetch them (server-side
  request forgery), whatever a URL parser strips before the scheme
  — unless ``allow_remote_media``;
- unknown fields: a misspelt parameter silently ignored is a bug the client never sees.
Empty prompts and conversations are refused by protocol.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidRequest
from .protocol import ParsedRequest, depth

DANGEROUS_FIELDS = ("chat_template", "chat_template_kwargs", "mm_processor_kwargs", "prompt_embeds",
                    "allowed_token_ids", "cache_salt")

_COMMON = {
    "model", "stream", "stream_options", "max_tokens", "n", "temperature", "top_p", "stop", "seed", "user",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format",
    "best_of",
    # vLLM sampling extensions
    "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "include_stop_str_in_output",
    "prompt_logprobs", "bad_words", "use_beam_search", "priority", "request_id", "return_tokens_as_token_ids",
    "return_token_ids", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "structured_outputs", "logits_processors", "vllm_xargs", "kv_transfer_params",
    "add_special_tokens", "echo", "suffix", "thinking_token_budget",
    *DANGEROUS_FIELDS,
}
KNOWN_FIELDS = {
    "chat": _COMMON | {
        "messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls", "functions",
        "function_call", "modalities", "audio", "reasoning_effort", "metadata", "store", "service_tier",
        "prediction", "web_search_options", "add_generation_prompt", "continue_final_message", "documents",
        "include_reasoning", "mm_processor_kwargs", "top_logprobs", "verbosity", "safety_identifier",
        "prompt_cache_key",
    },
    "completions": _COMMON | {"prompt"},
}
# POST /tokenize (tokenize_route.py): vLLM's TokenizeChatRequest / TokenizeCompletionRequest fields
TOKENIZE_FIELDS = {
    "chat": {"model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
             "return_token_strs", "tools", *DANGEROUS_FIELDS},
    "completions": {"model", "prompt", "add_special_tokens", "return_token_strs"},
}
_SCHEMA_FIELDS = ("guided_json", "guided_grammar", "guided_regex", "structured_outputs", "response_format")
_MEDIA_PARTS = {"image_url": "url", "audio_url": "url", "video_url": "url", "input_audio": None, "file": None}


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    max_n: int = 8
    max_logprobs: int = 20
    allow_fields: frozenset[str] = frozenset()
    allow_unknown_fields: bool = False
    allow_remote_media: bool = False
    max_schema_bytes: int = 64 * 1024
    max_schema_depth: int = 32


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _check_schema(value: Any, param: str, policy: RequestPolicy) -> None:
    # depth first: it is iterative, and serialising (for the size) something deeper than orjson's own limit fails
    if isinstance(value, dict | list) and depth(value, policy.max_schema_depth) > policy.max_schema_depth:
        raise _bad(f"'{param}' is nested deeper than {policy.max_schema_depth} levels", param, "schema_too_deep")
    size = len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else len(orjson.dumps(value))
    if size > policy.max_schema_bytes:
        raise _bad(f"'{param}' is {size} bytes; the limit is {policy.max_schema_bytes}", param, "schema_too_large")


def _check_int_cap(body: dict[str, Any], name: str, cap: int) -> None:
    value = body.get(name)
    if value is None or value is False or value is True:
        return
    if not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer", name, "invalid_type")
    if value < 0 or value > cap:
        raise _bad(f"'{name}' is {value}; this gateway allows 0 to {cap}", name)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strings(v: Any) -> bool:
    return isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)


# the JSON type of the fields the gateway passes through (null is always fine): a wrong one is a clear 400 here,
# before any worker sees it (the fields the gateway reads itself are checked where they are read)
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
            "length_penalty")
_INTEGERS = ("top_k", "seed", "truncate_prompt_tokens", "priority", "thinking_token_budget")
_BOOLEANS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
             "echo", "use_beam_search", "add_special_tokens", "add_generation_prompt", "continue_final_message",
             "return_tokens_as_token_ids", "return_token_ids", "parallel_tool_calls", "store", "include_reasoning")
_STRINGS = ("user", "suffix", "request_id", "reasoning_effort", "service_tier", "prompt_cache_key",
            "safety_identifier", "verbosity")
_OBJECTS = ("logit_bias", "response_format", "metadata", "vllm_xargs", "kv_transfer_params", "prediction",
            "web_search_options", "audio")
_TYPES: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(_NUMBERS, (_number, "a number")), **dict.fromkeys(_INTEGERS, (_integer, "an integer")),
    **dict.fromkeys(_BOOLEANS, (lambda v: isinstance(v, bool), "a boolean")),
    **dict.fromkeys(_STRINGS, (lambda v: isinstance(v, str), "a string")),
    **dict.fromkeys(_OBJECTS, (lambda v: isinstance(v, dict), "an object")),
    "stop": (_strings, "a string or an array of strings"), "bad_words": (_strings, "an array of strings"),
    "stop_token_ids": (lambda v: isinstance(v, list) and all(_integer(x) for x in v), "an array of integers"),
    "tool_choice": (lambda v: isinstance(v, str | dict), "a string or an object"),
    "tools": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "an array of objects"),
    "functions": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), "an array of objects"),
    "documents": (lambda v: isinstance(v, list), "an array"),
}
_CHAT_TYPES = {**_TYPES, "logprobs": (lambda v: isinstance(v, bool), "a boolean")}  # (completions: an integer)


def check(req: ParsedRequest, policy: RequestPolicy, fields: dict[str, set[str]] = KNOWN_FIELDS) -> None:
    """Raise the 400 the policy gives ``req`` (``fields``: what its route knows; /tokenize has its own)."""
    body = req.body
    known = None if policy.allow_unknown_fields else fields[req.route]
    types = _CHAT_TYPES if req.route == "chat" else _TYPES
    for key, value in body.items():
        if known is not None and key not in known:
            raise _bad(f"unknown parameter '{key[:64]}'", key[:64], "unknown_parameter")
        expected = types.get(key)
        if expected is not None and value is not None and not expected[0](value):
            raise _bad(f"'{key}' must be {expected[1]}", key, "invalid_type")
    for key in DANGEROUS_FIELDS:
        if body.get(key) is not None and key not in policy.allow_fields:
            raise _bad(f"'{key}' is not accepted by this gateway", key, "parameter_not_allowed")
    if body.get("best_of") is not None:
        raise _bad("'best_of' is not supported; use 'n'", "best_of", "parameter_not_allowed")
    if req.n > policy.max_n:
        raise _bad(f"'n' is {req.n}; this gateway allows at most {policy.max_n}", "n")
    _check_int_cap(body, "top_logprobs", policy.max_logprobs)
    _check_int_cap(body, "prompt_logprobs", policy.max_logprobs)
    if req.route == "completions":
        _check_int_cap(body, "logprobs", policy.max_logprobs)
    for key in _SCHEMA_FIELDS:
        if body.get(key) is not None:
            _check_schema(body[key], key, policy)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array", "tools", "invalid_type")
        _check_schema(tools, "tools", policy)
    if req.route == "chat" and not policy.allow_remote_media:
        _check_media(body["messages"])


# what URL parsers drop before they read a scheme (WHATWG and Python's urlsplit alike): leading and trailing C0
# controls and spaces, and tabs and line breaks anywhere (" \thttp://h" and "ht\ntp://h" are http URLs to them)
_URL_IGNORED = str.maketrans("", "", "\t\n\r")
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def _inline(url: str) -> bool:
    """Whether a media URL carries its data (``data:``): anything else is a URL the worker would fetch."""
    return url.translate(_URL_IGNORED).strip(_C0_AND_SPACE).lower().startswith("data:")


def _check_media(messages: list[dict[str, Any]]) -> None:
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type")
            if kind not in _MEDIA_PARTS:
                continue
            inner = part.get(kind)
            url = inner.get("url") if isinstance(inner, dict) else inner if isinstance(inner, str) else None
            if url is not None and not (isinstance(url, str) and _inline(url)):
                raise _bad("media is not fetched from URLs by this gateway's workers; send the data inline "
                           "(a data: URL)", f"messages[{i}].content[{j}]", "remote_media_not_allowed")


def check_min_tokens(req: ParsedRequest, max_tokens: int) -> None:
    min_tokens = req.body.get("min_tokens")
    if min_tokens is None:
        return
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise _bad("'min_tokens' must be a non-negative integer", "min_tokens", "invalid_type")
    if min_tokens > max_tokens:
        raise _bad(f"'min_tokens' ({min_tokens}) is above max_tokens ({max_tokens}) for this request",
                   "min_tokens")
