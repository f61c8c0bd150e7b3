"""OpenAI request parsing for the two generation routes.

The body is parsed once (orjson) into a dict that is forwarded after the gateway's edits, so unknown fields pass
through to vLLM (vLLM's ``OpenAIBaseModel`` allows extras); only the fields the gateway interprets are checked
here, by hand, because this runs on every request.  Anything malformed is an ``InvalidRequest`` naming the
parameter — never a 500.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .errors import InvalidRequest

Route = Literal["chat", "completions"]
ROUTES: dict[str, Route] = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


@dataclass(slots=True)
class ParsedRequest:
    route: Route
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    max_tokens_param: str
    n: int
    upstream_stream: bool = True

    @property
    def batch(self) -> int:
        """Prompts in the request: vLLM generates for each of a completions batch (texts or token-id lists)."""
        prompt = self.body.get("prompt") if self.route == "completions" else None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            return len(prompt)
        return 1


def _bad(message: str, param: str | None, code: str = "invalid_request") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def _wide_int(raw: bytes, name: str, value: float) -> int | None:
    """The integer literal behind ``value``: orjson reads an integer wider than 64 bits as a float, which must not
    make ``"max_tokens": 10000000000000000000000`` "not an integer" (``1e22`` written so stays one). Error path
    only: the field's one top-level-looking occurrence in the raw body, if it is that integer."""
    key = b'"' + name.encode() + b'"'
    found = re.findall(re.escape(key) + rb'\s*:\s*(\d{19,})(?![\d.eE])', raw)
    if len(found) != 1 or raw.count(key) != 1 or float(int(found[0])) != value:  # (not a nested field's)
        return None
    return int(found[0])


def _check_int(body: dict[str, Any], name: str, *, minimum: int, raw: bytes = b"") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            wide = _wide_int(raw, name, value) if value >= 2**63 else None
            if wide is not None:
                return wide
            raise _bad(f"'{name}' must be an integer, got {value!r}", name, "invalid_type")
        raise _bad(f"'{name}' must be an integer, got {type(value).__name__}", name, "invalid_type")
    if value < minimum:
        raise _bad(f"'{name}' must be at least {minimum}, got {value}", name, "invalid_value")
    return value


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _bad("'messages' must be an array of message objects", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must contain at least one message", "messages", "invalid_value")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"'messages[{i}].role' must be a non-empty string", f"messages[{i}].role", "invalid_type")
        content = msg.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(
                f"'messages[{i}].content' must be a string or an array of content parts",
                f"messages[{i}].content",
                "invalid_type",
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise _bad(
                        f"'messages[{i}].content[{j}]' must be a content part object with a 'type'",
                        f"messages[{i}].content[{j}]",
                        "invalid_type",
                    )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt", "invalid_value")
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            if not all(prompt):
                raise _bad("'prompt' must not contain empty strings", "prompt", "invalid_value")
            return
        if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in prompt):
            return
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)
               for p in prompt):
            return
    if isinstance(prompt, list) and not prompt:
        raise _bad("'prompt' must not be empty", "prompt", "invalid_value")
    raise _bad("'prompt' must be a string, an array of strings, or an array of token ids", "prompt", "invalid_type")


MAX_DEPTH = 128  # orjson serialises at most 254 levels; no real request comes near this


def depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively, stopping as soon as it passes ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def load_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or the 400 that says why it isn't one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object", None, "invalid_json")
    return body


def parse_request(route: Route, raw: bytes, body: dict[str, Any] | None = None) -> ParsedRequest:
    """``raw`` checked for ``route``; ``body``: ``raw`` already loaded (``load_body``), when it is."""
    if body is None:
        body = load_body(raw)
    # nesting can't exceed the number of openers: only walk bodies that have enough of them
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(body, MAX_DEPTH) > MAX_DEPTH:
        raise _bad(f"request body is nested deeper than {MAX_DEPTH} levels", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "model", "invalid_type")
    if route == "chat":
        _check_messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
        _check_prompt(body["prompt"])
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream", "invalid_type")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if opts and not stream:  # as vLLM and OpenAI answer it (the gateway streams from the worker either way)
            raise _bad("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options",
                       "invalid_request")
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        usage = opts.get("include_usage", False)
        if not isinstance(usage, bool):
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options", "invalid_type")
        include_usage = usage
    max_tokens = _check_int(body, "max_tokens", minimum=1, raw=raw)
    param = "max_tokens"
    if route == "chat":
        mct = _check_int(body, "max_completion_tokens", minimum=1, raw=raw)
        if mct is not None:  # as vLLM: max_completion_tokens wins over the deprecated max_tokens
            max_tokens, param = mct, "max_completion_tokens"
    n = _check_int(body, "n", minimum=1, raw=raw) or 1
    # The worker streams (see aggregate.py) except for what vLLM can't stream or a stream can't carry whole: beam
    # search, prompt logprobs (vLLM refuses them in a stream) and an echoed prompt (its logprobs come only in the
    # unstreamed answer); and, by the gateway's choice, --non-stream-upstream unary (the proxy decides that)
    upstream_stream = stream or not (body.get("use_beam_search") is True or body.get("prompt_logprobs") is not None
                                     or route == "completions" and body.get("echo") is True)
    return ParsedRequest(route, body, model, stream, include_usage, max_tokens, param, n, upstream_stream)


def named_model(raw: bytes) -> str | None:
    """The model a request body names, read again for the metrics of a request that failed validation (the error
    path only); None when the body does not name one."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def set_max_tokens(req: ParsedRequest, value: int) -> None:
    body = req.body
    if req.route == "chat" and "max_completion_tokens" in body:
        body["max_completion_tokens"] = value
        if body.get("max_tokens") is not None:
            body["max_tokens"] = value
    else:
        body["max_tokens"] = value


def upstream_body(req: ParsedRequest) -> bytes:
    """The body the worker gets: streamed (even for non-streaming clients: see aggregate.py) with usage asked
    for, so tokens can be counted."""
    body = req.body
    body["stream"] = req.upstream_stream
    if req.upstream_stream:
        opts = body.get("stream_options")
        if isinstance(opts, dict):
            if not opts.get("include_usage"):
                # continuous_usage_stats only counts with include_usage: asked for on the client's behalf, it
                # would put usage on every chunk of a client that asked for none
                body["stream_options"] = {**{k: v for k, v in opts.items() if k != "continuous_usage_stats"},
                                          "include_usage": True}
        else:
            body["stream_options"] = {"include_usage": True}
    elif "stream_options" in body:
        del body["stream_options"]  # vLLM rejects stream_options without stream
    return orjson.dumps(body)


MAX_TOKEN_COUNT = 10**8  # no prompt or answer is this long (the longest contexts are ~10 M tokens)


def token_count(value: object) -> int | None:
    """A token count a worker reported: an integer in 0..MAX_TOKEN_COUNT, else None."""
    return value if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT else None


def usage_counts(usage: object) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens from a worker's ``usage`` object, each a ``token_count`` or None.
    The counts go into Prometheus counters and a key's token budget, which a string, a negative number, a float
    or a 400-digit integer from a misbehaving worker would break (a counter refuses to go down or to overflow)
    after the client has its answer, and 10**15 would lock the key out for years."""
    if not isinstance(usage, dict):
        return None, None
    return token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
