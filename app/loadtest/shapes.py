"""Batch shapes (concurrency × prompt tokens × output tokens) and prompts of an exact token length.

Prompts are counted the way the server counts them, best source first: the model's own tokenizer on this machine
(``--tokenizer``, or the ``root`` that ``GET /v1/models`` reports when that directory exists here), else the
server's ``POST /tokenize`` (vLLM's), else an estimate of one token per word.  A prompt is a fixed first word, a
nonce that makes every request distinct (so a prefix cache can't serve it: as many one-token words as give
``NONCE_SPACE`` prompts), and filler words.  With a local tokenizer the words are taken from its vocabulary —
single tokens after a space — so every nonce costs the same and the length is exact; the report carries the counts
the server returned in ``usage``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from ..tokenizer import LocalTokenizer, has_local_tokenizer

NONCE_SPACE = 2**20  # distinct prompts per length, at least (as the length allows): a prefix cache never repeats one
MAX_NONCE_WORDS = 20
_ENGLISH = (
    "time year people way day man thing woman life child world school state family student group country problem "
    "hand part place case week company system program question work government number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war history party result "
    "change morning reason research girl guy moment air teacher force education the and that have for not with you "
    "this but his from they say her she will one all would there their what out about who get which when make can "
    "like just him know take into your good some could them see other than then now look only come its over think "
    "also use two how our first well even new want because any these give most very"
).split()


@dataclass(frozen=True, slots=True)
class Shape:
    concurrency: int
    prompt_tokens: int
    output_tokens: int

    @property
    def label(self) -> str:
        return f"c={self.concurrency} in={self.prompt_tokens} out={self.output_tokens}"


def parse_int_list(text: str) -> list[int]:
    """``"1,8,32"`` → ``[1, 8, 32]`` (each at least 1, duplicates dropped, order kept)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        value = int(part.removesuffix("k")) * scale
        if value < 1:
            raise ValueError(f"{value} is not a positive integer")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("empty list")
    return out


def shape_grid(concurrency: list[int], prompt_tokens: list[int], output_tokens: list[int]) -> list[Shape]:
    """Every combination; concurrency varies fastest so each (prompt, output) series is measured together."""
    return [Shape(c, p, o) for p, o, c in itertools.product(prompt_tokens, output_tokens, concurrency)]


class Counter(Protocol):
    """Counts the prompt tokens the server will see for a user message (chat) or a prompt (completions)."""

    source: str  # "local tokenizer" | "server /tokenize" | "server usage" | "estimate"
    exact: bool

    def count(self, text: str) -> int: ...


class LocalCounter:
    source = "local tokenizer"
    exact = True

    def __init__(self, model_dir: str | Path, *, chat: bool) -> None:
        self.path = Path(model_dir)
        self.tokenizer = LocalTokenizer(self.path)
        self.chat = chat

    def count(self, text: str) -> int:
        if self.chat:
            rendered = self.tokenizer.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
            return self.tokenizer.count(rendered, add_special_tokens=False)
        return self.tokenizer.count(text, add_special_tokens=True)

    def words(self) -> list[str]:
        """Lower-case alphabetic vocabulary entries that are one token after a space, in id order."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        out: list[str] = []
        for piece, tid in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if piece[:1] not in ("Ġ", "▁") or not piece[1:].isascii() or not piece[1:].isalpha():
                continue
            word = piece[1:]
            if len(word) < 2 or not word.islower():
                continue
            if self.tokenizer.encode(" " + word, add_special_tokens=False) == [tid]:
                out.append(word)
            if len(out) >= 4096:
                break
        return out


class ServerCounter:
    source = "server /tokenize"
    exact = True

    def __init__(self, client: httpx.Client, base_url: str, model: str, *, chat: bool) -> None:
        self.client, self.url, self.model, self.chat = client, base_url + "/tokenize", model, chat

    def count(self, text: str) -> int:
        body: dict[str, Any] = {"model": self.model}
        if self.chat:
            body.update(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            body["prompt"] = text
        r = self.client.post(self.url, json=body)
        r.raise_for_status()
        count: int = int(r.json()["count"])
        return count


class UsageCounter:
    """The server's own count, read from the ``usage`` of a one-token answer to the prompt: exact on any server that
    reports usage (OpenAI's API does), at one short generation per count (a few dozen per prompt length)."""

    source = "server usage"
    exact = True

    def __init__(self, client: httpx.Client, base_url: str, model: str, *, chat: bool) -> None:
        self.client, self.model, self.chat = client, model, chat
        self.url = base_url + ("/v1/chat/completions" if chat else "/v1/completions")
        self._seen: dict[str, int] = {}

    def count(self, text: str) -> int:
        n = self._seen.get(text)
        if n is None:
            body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "stream": False}
            if self.chat:
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = text
            r = self.client.post(self.url, json=body)
            r.raise_for_status()
            n = self._seen[text] = int(r.json()["usage"]["prompt_tokens"])
        return n


class EstimateCounter:
    """One token per word plus a guessed template overhead; the report says the lengths are estimates."""

    source = "estimate"
    exact = False

    def __init__(self, *, chat: bool) -> None:
        self.overhead = 8 if chat else 1

    def count(self, text: str) -> int:
        return self.overhead + len(text.split())


@dataclass(frozen=True, slots=True)
class ModelInfo:
    root: str | None = None
    max_model_len: int | None = None


def fetch_model_info(client: httpx.Client, base_url: str, model: str) -> ModelInfo:
    """The model's card from ``GET /v1/models`` (empty when the server has no such route or model)."""
    try:
        r = client.get(base_url + "/v1/models")
        doc = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return ModelInfo()
    cards = doc.get("data") if isinstance(doc, dict) else None
    for card in cards if isinstance(cards, list) else ():
        if isinstance(card, dict) and card.get("id") == model:
            root, mml = card.get("root"), card.get("max_model_len")
            return ModelInfo(root if isinstance(root, str) else None, mml if isinstance(mml, int) else None)
    return ModelInfo()


def choose_counter(client: httpx.Client, base_url: str, model: str, *, chat: bool, tokenizer: str | None,
                   info: ModelInfo) -> Counter:
    """``--tokenizer``, else the model's local root, else the server's ``/tokenize``, else the server's usage of a
    one-token answer, else an estimate."""
    if tokenizer is not None:
        if not has_local_tokenizer(tokenizer):
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.json there")
        return LocalCounter(tokenizer, chat=chat)
    if info.root and has_local_tokenizer(info.root):
        try:
            return LocalCounter(info.root, chat=chat)
        except Exception:  # an unreadable tokenizer: the server can still count
            pass
    for counter in (ServerCounter(client, base_url, model, chat=chat),
                    UsageCounter(client, base_url, model, chat=chat)):
        try:
            counter.count("hello")
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            continue
        return counter
    return EstimateCounter(chat=chat)


@dataclass(frozen=True, slots=True)
class PromptSet:
    """Prompts of one target length: ``text(i)`` is the i-th request's (distinct for ``i < distinct``)."""

    target: int
    measured: int  # the counter's count for text(0)
    stable: bool  # another nonce counted the same
    first: str
    nonce: tuple[str, ...]
    nonce_words: int
    body: str

    @property
    def distinct(self) -> int:
        return int(len(self.nonce) ** self.nonce_words)

    def text(self, i: int) -> str:
        parts, n = [self.first], len(self.nonce)
        for _ in range(self.nonce_words):
            i, d = divmod(i, n)
            parts.append(self.nonce[d])
        return " ".join(parts) + self.body


def _nonce_words(counter: Counter, first: str, words: list[str]) -> list[str]:
    """Words that cost exactly one token after the first word (checked on at most 24 candidates)."""
    base = counter.count(first)
    clean = [w for w in words[1:25] if counter.count(f"{first} {w}") == base + 1]
    return clean if len(clean) >= 2 else words[1:17]


_TAILS = ("x", "xx", "xxx", " x", " xx", " xxx", " x x", " xx xx")  # what may close the last token or two


def build_prompts(target: int, counter: Counter, words: list[str], *, seed: int = 0) -> PromptSet:
    """Fit the filler length so ``counter`` counts exactly ``target`` tokens (or as close as its words allow)."""
    first = words[0]
    nonce = tuple(_nonce_words(counter, first, words))
    rng = random.Random(seed * 1_000_003 + target)
    filler = rng.choices(words, k=target + 64)
    k = min(MAX_NONCE_WORDS, math.ceil(math.log(NONCE_SPACE, max(2, len(nonce)))))
    while k > 0 and counter.count(" ".join([first, *nonce[:1] * k])) > target:
        k -= 1  # a very short prompt: fewer distinct prompts rather than a longer one
    head = " ".join([first, *nonce[:1] * k])

    def count(n: int) -> int:
        return counter.count(head + "".join(" " + w for w in filler[:n]))

    base = count(0)
    if base > target:
        raise ValueError(f"{target} prompt tokens is shorter than the smallest prompt ({base} tokens with the "
                         "chat template); ask for more")
    n = target - base
    tried: dict[int, int] = {}
    if n > 32:  # a short sample first: the first full-length guess must not overshoot a small context 5-fold
        tried[16] = count(16)
        per_word = (tried[16] - base) / 16
        n = max(1, min(len(filler), round((target - base) / per_word))) if per_word > 0 else n
    for _ in range(12):
        c = tried.setdefault(n, count(n))
        if c == target:
            break
        step = target - c
        per_word = (c - base) / n if n else 1.0
        nxt = max(0, min(len(filler), n + (round(step / per_word) if per_word > 0 else step)))
        if nxt in tried:  # oscillating: walk one word at a time
            nxt = max(0, min(len(filler), n + (1 if step > 0 else -1)))
            if nxt in tried:
                break
        n = nxt
    n = min(tried, key=lambda m: (abs(tried[m] - target), tried[m] > target))
    body = "".join(" " + w for w in filler[:n])
    if tried[n] != target:  # whole words step over it: the longest filler below it, and a few characters more
        below = max((m for m in tried if tried[m] < target), default=None)
        if below is not None:
            shorter = "".join(" " + w for w in filler[:below])
            body = next((shorter + t for t in _TAILS if counter.count(head + shorter + t) == target), body)
    prompts = PromptSet(target, 0, True, first, nonce, k, body)
    measured = counter.count(prompts.text(0))
    other = counter.count(prompts.text(prompts.distinct // 2 + 1)) if k else measured
    return PromptSet(target, measured, other == measured, first, nonce, k, body)


def prompt_words(counter: Counter) -> list[str]:
    if isinstance(counter, LocalCounter):
        words = counter.words()
        if len(words) >= 16:
            return words
    return list(_ENGLISH)


def body_factory(prompts: PromptSet, *, model: str, output_tokens: int, chat: bool,
                 ignore_eos: bool, first: int = 0) -> Callable[[int], bytes]:
    """``body(i)``: the JSON body of request i — streaming, usage requested, ``max_tokens`` = output tokens — with
    prompt ``first + i`` of the set (a run starts at a random one and each shape goes on where the last stopped:
    neither a re-run nor the next shape meets a prompt a prefix cache holds)."""
    template: dict[str, Any] = {"model": model, "max_tokens": output_tokens, "stream": True,
                                "stream_options": {"include_usage": True}}
    if ignore_eos:
        template["ignore_eos"] = True

    def body(i: int) -> bytes:
        text = prompts.text(first + i)
        if chat:
            return orjson.dumps({**template, "messages": [{"role": "user", "content": text}]})
        return orjson.dumps({**template, "prompt": text})

    return body
