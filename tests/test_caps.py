from __future__ import annotations

import asyncio

import pytest

from app.auth import KeyCaps
from app.caps import Caps, Decision, PromptSize, decide
from app.errors import ContextLengthExceeded, MaxTokensExceeded


def size(n: int, bound: int | None = None) -> tuple[PromptSize, list[int]]:
    calls: list[int] = []

    async def exact() -> int:
        calls.append(n)
        return n

    return PromptSize(bound, exact), calls


def run(caps: Caps, requested: int | None, prompt: PromptSize) -> Decision:
    return asyncio.run(decide(caps, requested, "max_tokens", prompt, prompt_param="messages", model="m"))


CAPS = Caps.build(model_max_len=2048, context_cap=1000, max_tokens_cap=300, default_max_tokens=100, policy="clamp")


def test_build_never_exceeds_the_model_window() -> None:
    caps = Caps.build(model_max_len=512, context_cap=4096, max_tokens_cap=None, default_max_tokens=None,
                      policy="clamp")
    assert (caps.context_cap, caps.max_tokens_cap, caps.default_max_tokens) == (512, 512, 512)
    caps = Caps.build(model_max_len=512, context_cap=None, max_tokens_cap=64, default_max_tokens=256,
                      policy="clamp")
    assert (caps.context_cap, caps.max_tokens_cap, caps.default_max_tokens) == (512, 64, 64)


def test_absent_gets_the_default_without_a_clamp() -> None:
    prompt, _ = size(10, bound=10)
    d = run(CAPS, None, prompt)
    assert (d.max_tokens, d.clamped_from) == (100, None)


def test_above_cap_is_clamped_and_remembers_the_original() -> None:
    prompt, _ = size(10, bound=10)
    d = run(CAPS, 5000, prompt)
    assert (d.max_tokens, d.clamped_from, d.reason) == (300, 5000, "max_tokens_cap")


def test_reject_policy() -> None:
    caps = Caps.build(model_max_len=2048, context_cap=None, max_tokens_cap=300, default_max_tokens=None,
                      policy="reject")
    prompt, _ = size(10, bound=10)
    with pytest.raises(MaxTokensExceeded) as err:
        run(caps, 301, prompt)
    assert err.value.param == "max_tokens" and err.value.status == 400
    assert run(caps, 300, prompt).max_tokens == 300
    with pytest.raises(MaxTokensExceeded) as err:  # the newer field: the same param, its own name in the message
        asyncio.run(decide(caps, 301, "max_completion_tokens", prompt, prompt_param="messages", model="m"))
    assert err.value.param == "max_tokens" and "'max_completion_tokens' is 301" in err.value.message


def test_reject_policy_refuses_only_above_the_configured_cap_and_lets_the_context_clamp() -> None:
    """A max_tokens under the max_tokens cap that the context can't hold is lowered to what is left, as under
    clamp: the policy is about the max_tokens cap, not about the context window."""
    caps = Caps.build(model_max_len=2048, context_cap=100, max_tokens_cap=4096, default_max_tokens=None,
                      policy="reject")
    assert (caps.max_tokens_cap, caps.reject_above) == (100, 4096)
    prompt, _ = size(12)
    d = run(caps, 500, prompt)
    assert (d.max_tokens, d.clamped_from, d.reason) == (88, 500, "context_cap")
    with pytest.raises(MaxTokensExceeded) as err:
        run(caps, 4097, prompt)
    assert "above this gateway's cap of 4096" in err.value.message
    unset = Caps.build(model_max_len=2048, context_cap=None, max_tokens_cap=None, default_max_tokens=None,
                       policy="reject")
    d = run(unset, 3000, prompt)  # no max_tokens cap at all: nothing is refused for its size
    assert (d.max_tokens, d.clamped_from, d.reason) == (2036, 3000, "context_cap")


def test_the_stricter_reject_threshold_wins() -> None:
    a = Caps.build(model_max_len=2048, context_cap=None, max_tokens_cap=300, default_max_tokens=None,
                   policy="reject")
    b = Caps.build(model_max_len=2048, context_cap=100, max_tokens_cap=None, default_max_tokens=None,
                   policy="clamp")
    both = a.tighten(b)
    assert (both.max_tokens_cap, both.reject_above, both.policy) == (100, 300, "reject")
    # a clamp preset's cap lowers but refuses nothing: 1500 passes the reject preset's 2048, clamped to 1024
    mixed = Caps.build(model_max_len=4096, context_cap=None, max_tokens_cap=2048, default_max_tokens=None,
                       policy="reject").tighten(
        Caps.build(model_max_len=4096, context_cap=None, max_tokens_cap=1024, default_max_tokens=None,
                   policy="clamp"))
    prompt, _ = size(10, bound=10)
    d = run(mixed, 1500, prompt)
    assert (d.max_tokens, d.clamped_from) == (1024, 1500)
    with pytest.raises(MaxTokensExceeded):
        run(mixed, 2049, prompt)
    assert KeyCaps(max_tokens_cap=200).apply(a).reject_above == 200
    assert KeyCaps(context_cap=50).apply(a).reject_above == 300


def test_bound_that_proves_fit_skips_the_exact_count() -> None:
    prompt, calls = size(10, bound=700)
    assert run(CAPS, 300, prompt).prompt_tokens is None
    assert calls == []


def test_inconclusive_bound_counts_exactly() -> None:
    prompt, calls = size(650, bound=800)
    d = run(CAPS, 300, prompt)
    assert calls == [650] and d.prompt_tokens == 650
    assert (d.max_tokens, d.clamped_from, d.reason) == (300, None, None)


def test_prompt_plus_max_tokens_over_the_cap_is_clamped_to_what_is_left() -> None:
    prompt, _ = size(900)
    d = run(CAPS, 200, prompt)
    assert (d.max_tokens, d.clamped_from, d.reason) == (100, 200, "context_cap")


def test_default_lowered_by_context_is_not_reported_as_a_client_clamp() -> None:
    prompt, _ = size(950)
    d = run(CAPS, None, prompt)
    assert (d.max_tokens, d.clamped_from) == (50, None)


def test_prompt_of_exactly_the_cap_passes_with_one_token() -> None:
    prompt, _ = size(1000)
    d = run(CAPS, 10, prompt)
    assert d.max_tokens == 1 and d.clamped_from == 10


def test_prompt_one_over_the_cap_is_rejected() -> None:
    prompt, _ = size(1001)
    with pytest.raises(ContextLengthExceeded) as err:
        run(CAPS, 10, prompt)
    assert err.value.error_code == "context_length_exceeded" and err.value.param == "messages"


def test_prompt_filling_the_whole_model_window_is_rejected() -> None:
    caps = Caps.build(model_max_len=1000, context_cap=None, max_tokens_cap=None, default_max_tokens=None,
                      policy="clamp")
    prompt, _ = size(1000)
    with pytest.raises(ContextLengthExceeded):
        run(caps, 1, prompt)
