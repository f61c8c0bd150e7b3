"""How big is this prompt? The bridge between a parsed request and caps.decide().

With the model's tokenizer on this machine the prompt is rendered and counted locally (a long one in a thread,
so the event loop never stalls); requests the local renderer can't reproduce exactly (content parts, tools, roles
other than system/user/assistant, a null content: ``_plain_size``) and models without a local tokenizer are
counted by a worker's ``POST /tokenize``, which is exact by definition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from .caps import PromptSize
from .errors import InvalidRequest
from .protocol import ParsedRequest
from .tokenizer import LocalTokenizer, TemplateError

_T = TypeVar("_T")

RemoteCount = Callable[[dict[str, Any]], Awaitable[int]]
# request fields vLLM hands the chat template (an empty tools list too: templates test "tools is not none")
_TEMPLATE_INPUTS = ("tools", "documents", "reasoning_effort", "chat_template_kwargs", "chat_template")
# what a worker's /tokenize is given of them (reasoning_effort as the template kwargs it becomes), and the flags
_REMOTE_CHAT_FIELDS = (*(f for f in _TEMPLATE_INPUTS if f != "reasoning_effort"), "add_generation_prompt",
                       "continue_final_message")


# What the local renderer reproduces exactly: vLLM hands these messages to the chat template as they come.  Other
# shapes it rewrites first, in ways that vary with its version and the template: content parts joined, a null
# content made empty, "developer" turned into a merged "system" where the template lacks that role, tool calls
# and reasoning re-validated, Claude Code's billing line dropped from a system message.  Those are counted by a
# worker's /tokenize, exact by definition.
_PLAIN_ROLES = frozenset(("system", "user", "assistant"))
_PLAIN_KEYS = frozenset(("role", "content", "name"))
_BILLING_HEADER = "x-anthropic-billing-header"


def _plain_size(messages: list[dict[str, Any]]) -> int | None:
    """The characters of all message contents, or None when a message is not one the local render reproduces."""
    size = 0
    for m in messages:
        content = m.get("content")
        if (not isinstance(content, str) or m.get("role") not in _PLAIN_ROLES or not _PLAIN_KEYS.issuperset(m)
                or not isinstance(m.get("name", ""), str)
                or m["role"] == "system" and content.startswith(_BILLING_HEADER)):
            return None
        size += len(content)
    return size


def _template_error(exc: TemplateError) -> InvalidRequest:
    return InvalidRequest(str(exc), param="messages", code="chat_template_error")


class PromptCounter:
    def __init__(self, executor: Executor, *, offloop_bytes: int) -> None:
        self._executor = executor
        self._offloop = offloop_bytes

    def size(self, req: ParsedRequest, tokenizer: LocalTokenizer | None, remote: RemoteCount, *,
             max_model_len: int) -> PromptSize:
        size = self._size(req, tokenizer, remote)
        keep = req.body.get("truncate_prompt_tokens")
        if type(keep) is int and keep == -1:  # vLLM 0.32: as much as the worker's context holds, less one
            keep = max_model_len - 1
        if type(keep) is int and keep >= 1:  # vLLM cuts the prompt to `keep` tokens: what the context holds
            return _truncated(size, keep)
        return size

    def _size(self, req: ParsedRequest, tokenizer: LocalTokenizer | None, remote: RemoteCount) -> PromptSize:
        body = req.body
        if req.route == "chat":
            messages: list[dict[str, Any]] = body["messages"]
            chars = _plain_size(messages)
            if tokenizer is None or chars is None or any(body.get(k) is not None for k in _TEMPLATE_INPUTS):
                payload: dict[str, Any] = {"model": req.model, "messages": messages}
                for key in _REMOTE_CHAT_FIELDS:
                    if key in body:
                        payload[key] = body[key]
                effort = body.get("reasoning_effort")
                if effort is not None:  # what vLLM's chat request makes of it (/tokenize has no such field)
                    kwargs = {"reasoning_effort": effort, "enable_thinking": effort != "none"}
                    user = body.get("chat_template_kwargs")
                    payload["chat_template_kwargs"] = {**kwargs, **(user if isinstance(user, dict) else {})}
                return PromptSize(None, lambda: remote(payload))
            return self._chat_local(tokenizer, messages, body, chars)
        return self._completion(tokenizer, req, remote)

    def _chat_local(self, tok: LocalTokenizer, messages: list[dict[str, Any]], body: dict[str, Any],
                    chars: int) -> PromptSize:
        add_gen = body.get("add_generation_prompt", True) is not False
        cont = body.get("continue_final_message") is True

        def render() -> str:
            try:
                return tok.render_chat(messages, add_generation_prompt=add_gen and not cont,
                                       continue_final_message=cont)
            except TemplateError as exc:
                raise _template_error(exc) from None

        if chars > self._offloop:
            def count_all() -> int:
                return tok.count(render(), add_special_tokens=False)
            return PromptSize(None, lambda: self._offload(count_all))
        text = render()

        async def exact() -> int:
            return tok.count(text, add_special_tokens=False)

        return PromptSize(tok.upper_bound(text, add_special_tokens=False), exact)

    def _completion(self, tok: LocalTokenizer | None, req: ParsedRequest, remote: RemoteCount) -> PromptSize:
        prompt = req.body["prompt"]
        special = req.body.get("add_special_tokens", True) is not False
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return PromptSize(len(prompt), _const(len(prompt)))
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            lengths = [len(p) for p in prompt]
            return _batch(max(lengths), _const(lengths))
        texts: list[str] = [prompt] if isinstance(prompt, str) else prompt
        if tok is None:
            async def via_worker() -> list[int]:
                return [await remote({"model": req.model, "prompt": t, "add_special_tokens": special})
                        for t in texts]
            return _batch(None, via_worker)
        bounds = [tok.upper_bound(t, add_special_tokens=special) for t in texts]
        bound = None if any(b is None for b in bounds) else max(b for b in bounds if b is not None)

        def count_each() -> list[int]:
            return [tok.count(t, add_special_tokens=special) for t in texts]

        if sum(len(t) for t in texts) > self._offloop:
            return _batch(bound, lambda: self._offload(count_each))

        async def each() -> list[int]:
            return count_each()

        return _batch(bound, each)

    async def _offload(self, fn: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


def _batch(bound: int | None, count_each: Callable[[], Awaitable[list[int]]]) -> PromptSize:
    """The prompts of a completions request (one, or a batch), each counted once however often it is asked."""
    memo: list[int] = []

    async def each() -> list[int]:
        if not memo:
            memo.extend(await count_each())
        return memo

    async def longest() -> int:
        return max(await each())

    return PromptSize(bound, longest, each)


def _const(v: _T) -> Callable[[], Awaitable[_T]]:
    async def value() -> _T:
        return v
    return value


def _truncated(size: PromptSize, keep: int) -> PromptSize:
    """A prompt vLLM cuts to its last ``keep`` tokens: no bigger than that, and counted only when it may be less."""
    async def exact() -> int:
        return min(await size.exact(), keep)

    each = None
    if size.each is not None:
        whole = size.each

        async def each_cut() -> list[int]:
            return [min(n, keep) for n in await whole()]
        each = each_cut
    return PromptSize(keep if size.bound is None else min(size.bound, keep), exact, each)
