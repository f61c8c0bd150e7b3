"""max_tokens and context caps, decided before any GPU time is spent.

The rules, in order:
1. ``max_tokens`` (or ``max_completion_tokens``) absent → the default; present → validated by protocol.py.
2. Above the max_tokens cap → ``clamp`` lowers it (and the response says so) or ``reject`` answers 400. A
   max_tokens under the cap but above the context cap is lowered under either policy (rule 4).
3. Prompt tokens above the context cap → 400 ``context_length_exceeded``, counted exactly with the model's own
   tokenizer (or by the worker's ``/tokenize`` where no local tokenizer exists).
4. Prompt + max_tokens above the context cap → max_tokens is lowered to what is left. vLLM would otherwise cut
   the answer short silently.  A prompt that fills the cap exactly still gets one token, unless the worker's own
   limit leaves none (then it is refused like rule 3).

Counting is skipped when a cheap upper bound (bytes of the rendered prompt) already proves the request fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from .errors import ContextLengthExceeded, MaxTokensExceeded

CapPolicy = Literal["clamp", "reject"]


@dataclass(frozen=True, slots=True)
class CapConfig:
    """Configured caps; a None field means "not set here" (see ``resolve``)."""

    max_tokens_cap: int | None = None
    default_max_tokens: int | None = None
    context_cap: int | None = None
    policy: CapPolicy | None = None

    def resolve(self, *fallbacks: CapConfig) -> CapConfig:
        """Each field from the first config that sets it: flags/env, then the preset, then built-in defaults."""
        out = self
        for fb in fallbacks:
            out = CapConfig(
                out.max_tokens_cap if out.max_tokens_cap is not None else fb.max_tokens_cap,
                out.default_max_tokens if out.default_max_tokens is not None else fb.default_max_tokens,
                out.context_cap if out.context_cap is not None else fb.context_cap,
                out.policy if out.policy is not None else fb.policy,
            )
        return out

    def build(self, model_max_len: int) -> Caps:
        return Caps.build(model_max_len=model_max_len, context_cap=self.context_cap,
                          max_tokens_cap=self.max_tokens_cap, default_max_tokens=self.default_max_tokens,
                          policy=self.policy or "clamp")


BUILTIN_CAPS = CapConfig(max_tokens_cap=4096, default_max_tokens=256, context_cap=None, policy="clamp")


NO_CAP = 2**63 - 1  # Caps.reject_above where no max_tokens cap is configured: nothing is refused for its size


@dataclass(frozen=True, slots=True)
class Caps:
    """Effective caps for one model on one worker pool.

    ``max_tokens_cap`` is what max_tokens is lowered to (never above the context cap); ``reject_above`` is the
    configured max_tokens cap of a ``reject`` policy, which it refuses requests above (the lowest of them in a pool
    whose presets differ; a clamp preset's cap only lowers).  A max_tokens under it that only the context, or a
    clamp preset's cap, can't hold is lowered (rule 4), under either policy.
    """

    max_tokens_cap: int
    default_max_tokens: int
    context_cap: int
    model_max_len: int
    policy: CapPolicy = "clamp"
    reject_above: int = NO_CAP

    @classmethod
    def build(cls, *, model_max_len: int, context_cap: int | None, max_tokens_cap: int | None,
              default_max_tokens: int | None, policy: CapPolicy) -> Caps:
        ctx = model_max_len if context_cap is None else min(context_cap, model_max_len)
        cap = ctx if max_tokens_cap is None else min(max_tokens_cap, ctx)
        default = cap if default_max_tokens is None else min(default_max_tokens, cap)
        # only a reject policy refuses: a clamp config's cap is no threshold (when a pool obeys both, see tighten)
        reject_above = NO_CAP if max_tokens_cap is None or policy == "clamp" else max_tokens_cap
        return cls(cap, default, ctx, model_max_len, policy, reject_above)

    def tighten(self, other: Caps) -> Caps:
        """The stricter of two (a pool whose workers come from different presets obeys all of them)."""
        return Caps(min(self.max_tokens_cap, other.max_tokens_cap),
                    min(self.default_max_tokens, other.default_max_tokens),
                    min(self.context_cap, other.context_cap), min(self.model_max_len, other.model_max_len),
                    "reject" if "reject" in (self.policy, other.policy) else "clamp",
                    min(self.reject_above, other.reject_above))


@dataclass(frozen=True, slots=True)
class Decision:
    max_tokens: int
    clamped_from: int | None  # the client's own value, when the gateway lowered it
    reason: str | None  # "max_tokens_cap" | "context_cap" when clamped
    prompt_tokens: int | None  # exact count, when one was needed


@dataclass(frozen=True, slots=True)
class PromptSize:
    """How big the prompt is: an upper bound (cheap), and a way to get the exact count when the bound can't decide."""

    bound: int | None
    exact: Callable[[], Awaitable[int]]
    # a completions batch: each prompt's exact count (its key's token budget takes the sum; the caps, in ``exact``,
    # the longest); None for one prompt
    each: Callable[[], Awaitable[list[int]]] | None = None


async def decide(caps: Caps, requested: int | None, param: str, prompt: PromptSize, *, prompt_param: str,
                 model: str) -> Decision:
    clamped_from: int | None = None
    reason: str | None = None
    if requested is None:
        max_tokens = caps.default_max_tokens
    elif requested > caps.max_tokens_cap:
        above_cap = requested > caps.reject_above
        if caps.policy == "reject" and above_cap:
            raise MaxTokensExceeded(  # param "max_tokens" for either field (the contract); the message names it
                f"'{param}' is {requested}, above this gateway's cap of {caps.reject_above} for model '{model}'",
                param="max_tokens",
            )
        # lowered under either policy below a reject threshold: to a clamp cap, or to what the context holds
        max_tokens, clamped_from = caps.max_tokens_cap, requested
        reason = "max_tokens_cap" if caps.max_tokens_cap < caps.context_cap else "context_cap"
    else:
        max_tokens = requested

    if prompt.bound is not None and prompt.bound + max_tokens <= caps.context_cap:
        return Decision(max_tokens, clamped_from, reason, None)

    n_prompt = await prompt.exact()
    if n_prompt > caps.context_cap or n_prompt >= caps.model_max_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {caps.context_cap} tokens. However, your prompt is "
            f"{n_prompt} tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
            param=prompt_param,
        )
    left = max(1, caps.context_cap - n_prompt)
    if max_tokens > left:
        if requested is not None:
            clamped_from = requested
            reason = "context_cap"
        max_tokens = left
    return Decision(max_tokens, clamped_from, reason, n_prompt)
