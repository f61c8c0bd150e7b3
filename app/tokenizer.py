"""The model's own tokenizer and chat template, counted exactly the way vLLM counts.

vLLM renders the chat template with ``add_generation_prompt`` (Jinja, as transformers does) and tokenises the
result without adding special tokens; a completion prompt is tokenised with special tokens added.  We load the
same ``tokenizer.json`` with the ``tokenizers`` library and render the same template with the same Jinja
environment transformers uses, so the count matches vLLM's ``POST /tokenize`` token for token (the integration
tests compare them).  Requests this can't render exactly (non-text content parts, tools) are counted by the
worker instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

log = logging.getLogger("tokengate.tokenizer")

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The chat template refused the conversation (e.g. ``raise_exception`` in the template)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, unicode kept
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


@lru_cache(maxsize=32)
def _compiled(template: str) -> tuple[jinja2.Template, dict[str, Any]]:
    """The template and the globals it can see, flattened once."""
    compiled = _compile(template)
    return compiled, dict(compiled.globals)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # AddedToken serialised
        return str(value["content"])
    return None


@dataclass(frozen=True, slots=True)
class _Normalizer:
    """Whether the byte-length upper bound is sound for this tokenizer (no normaliser that can grow text)."""

    sound: bool
    slack: int


def _bound_rule(tok_json: dict[str, Any]) -> _Normalizer:
    norm = tok_json.get("normalizer")
    model = (tok_json.get("model") or {}).get("type")
    if model not in ("BPE", "Unigram", "WordPiece"):
        return _Normalizer(False, 0)
    steps = [] if norm is None else norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    # Prepend("▁") adds one token at most; Replace(" ", "▁") maps one byte to three but merges keep one token
    # per original byte or fewer.  Anything else (NFKC, ...) may expand text: count exactly instead.
    slack = 1  # a Metaspace pre-tokenizer may prepend one "▁" of its own
    for step in steps:
        kind = step.get("type")
        if kind == "Prepend":
            slack += 1
        elif kind == "Replace" and step.get("content") == "▁" and (step.get("pattern") or {}).get("String") == " ":
            continue
        else:
            return _Normalizer(False, 0)
    return _Normalizer(True, slack)


# Pre-tokenizer regexes under which a space (U+0020) is never inside a pre-token, only at its start or in an
# all-whitespace one, and which have no anchors or look-behind: GPT-2's (ByteLevel's own), Llama-3's (cl100k),
# Qwen2's. Text cut just before a space that follows a letter or digit is pre-tokenised into exactly the same
# pieces whole or cut.
_CUTTABLE_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
}
PIECE_CHARS = 4096  # a prompt is counted in pieces (in parallel) only from this many characters per piece


def _cuttable(tok_json: dict[str, Any]) -> bool:
    """Whether a long text may be counted in pieces cut before spaces (``_cut``), with the same total: a
    byte-level BPE with no normaliser, a pre-tokenizer whose pieces never span such a space, and added tokens
    that neither contain whitespace nor strip it."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") or tok_json.get("normalizer") is not None:
        return False
    for added in tok_json.get("added_tokens") or []:
        content = str(added.get("content", ""))
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word") or any(c.isspace() for c in content):
            return False
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True) is not False
    if pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") in _CUTTABLE_SPLITS
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False)


_CUT_AT = re.compile(r"(?<=[^\W_]) (?=[^\W\d_])")  # a space after an alphanumeric, before a letter (or a numeral)


def _cut(text: str, pieces: int) -> list[str]:
    """``text`` in up to ``pieces`` parts of about equal length, each after the first starting at a space that
    follows a letter or digit and precedes a letter (the regex finds candidates in C: a prompt of spaces between
    digits is not walked space by space in Python)."""
    n = len(text)
    parts: list[str] = []
    start = 0
    for k in range(1, pieces):
        m = _CUT_AT.search(text, max(k * n // pieces, start + 1))
        while m is not None and not text[m.start() + 1].isalpha():  # [^\W\d_] also takes numerals like "²"
            m = _CUT_AT.search(text, m.start() + 1)
        if m is None:
            break
        i = m.start()
        parts.append(text[start:i])
        start = i
    parts.append(text[start:])
    return parts


class LocalTokenizer:
    """Counts prompt tokens for one model from its directory (``tokenizer.json`` + chat template)."""

    def __init__(self, model_dir: str | Path, *, piece_chars: int = PIECE_CHARS, max_pieces: int | None = None) -> None:
        root = Path(model_dir)
        tok_path = root / "tokenizer.json"
        self._tok = Tokenizer.from_file(str(tok_path))
        # transformers (and so vLLM) encodes a prompt whole: no truncation or padding a tokenizer.json may carry
        self._tok.no_truncation()
        self._tok.no_padding()
        tok_json = json.loads(tok_path.read_text(encoding="utf-8"))
        self._cuttable = _cuttable(tok_json)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._max_pieces = max_pieces if max_pieces is not None else min(8, cores)
        self._piece_chars = piece_chars
        config: dict[str, Any] = {}
        cfg_path = root / "tokenizer_config.json"
        if cfg_path.exists():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        jinja_path = root / "chat_template.jinja"
        if jinja_path.exists():
            template = jinja_path.read_text(encoding="utf-8")
        elif (root / "chat_template.json").exists():
            template = json.loads((root / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._special: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                self._special[key] = text
        rule = _bound_rule(tok_json)
        self._bound_sound = rule.sound
        post = tok_json.get("post_processor")
        self._special_added = self._tok.num_special_tokens_to_add(False) if post else 0
        self._bound_slack = rule.slack

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        if self.chat_template is None:
            raise TemplateError("this model has no chat template; use /v1/completions")
        try:
            template, base = _compiled(self.chat_template)
            # one flat dict as the context: Template.render would merge the environment's globals (a ChainMap)
            # into a new dict on every call, and even new_context(shared=True) walks that ChainMap (for
            # {% import %}, which chat templates don't use) — half the render time of a short chat
            # and what vLLM's chat request hands every template besides (transformers' tools and documents, vLLM's
            # reasoning_effort), None when the request has none: "is defined" holds for them there, so here too
            variables = {**base, **self._special, "messages": messages, "tools": None, "documents": None,
                         "reasoning_effort": None, "add_generation_prompt": add_generation_prompt}
            env = template.environment
            context = env.context_class(env, variables, template.name, template.blocks)
            text = jinja2.utils.concat(template.root_render_func(context))
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # the template's own Python on the request's values: '+' on a null content, ...
            raise TemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
        if continue_final_message and messages:
            last = messages[-1].get("content")
            if isinstance(last, str) and last and last in text:
                text = text[: text.rindex(last) + len(last)]
        return text

    def upper_bound(self, text: str, *, add_special_tokens: bool) -> int | None:
        """A cheap bound that is never below the exact count, or None when no sound bound exists."""
        if not self._bound_sound:
            return None
        extra = self._special_added if add_special_tokens else 0
        return len(text.encode("utf-8", "surrogatepass")) + extra + self._bound_slack

    def count(self, text: str, *, add_special_tokens: bool) -> int:
        # encode_batch_fast skips the offsets (a third of the time of encode for a long prompt)
        fast = getattr(self._tok, "encode_batch_fast", None)
        if fast is None:
            return len(self._tok.encode(text, add_special_tokens=add_special_tokens))
        pieces = min(self._max_pieces, len(text) // self._piece_chars)
        if pieces > 1 and self._cuttable:
            # a long prompt in pieces, which the tokenizer encodes on several cores at once (its batch call
            # releases the GIL): ~40 % less time for an 8k-token prompt on 2 cores, the same count
            parts = _cut(text, pieces)
            if len(parts) > 1:
                total = sum(len(e) for e in fast(parts, add_special_tokens=False))
                return total + (self._special_added if add_special_tokens else 0)
        return len(fast([text], add_special_tokens=add_special_tokens)[0])

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)


def has_local_tokenizer(path: str | None) -> bool:
    return bool(path) and Path(str(path), "tokenizer.json").is_file()


TokenizerLoader = Callable[[str], LocalTokenizer]

# what a LocalTokenizer reads: two model directories with the same bytes in these count alike
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json")
_KEEP_LOADED = 4  # tokenizers kept for fingerprints no model uses right now (a rollback, workers that disagree)


class TokenizerStore:
    """Model id → its local tokenizer, loaded once (in a thread) when a worker reports a local model path, or
    from the path configured for the model (``--tokenizer MODEL=PATH``: workers on other machines).

    Tokenizers are known by a fingerprint of their files, not by path: workers that serve one model from two
    copies share one load, and a worker restarted on another version of the model (another path, other files)
    brings its tokenizer in. Workers that report different tokenizers under one model name are logged once; the
    count then follows the worker checked last, from tokenizers loaded once each."""

    def __init__(self, paths: dict[str, str] | None = None, *, loader: TokenizerLoader = LocalTokenizer) -> None:
        self._by_model: dict[str, LocalTokenizer | None] = {}
        self._prints: dict[str, str] = {}  # model → fingerprint of the tokenizer it counts with
        self._seen: dict[str, dict[str, str]] = {}  # model → every fingerprint reported for it → one path of it
        self._loaded: dict[str, LocalTokenizer] = {}  # fingerprint → tokenizer, least recently used first
        self._stats: dict[str, tuple[tuple[tuple[int, int] | None, ...], str]] = {}  # path → (file stats, print)
        self._warned: set[str] = set()
        self._failed: set[str] = set()  # fingerprints whose files did not load
        self._loading: dict[str, asyncio.Future[LocalTokenizer]] = {}
        self._paths = dict(paths or {})
        self._loader = loader

    def get(self, model: str) -> LocalTokenizer | None:
        return self._by_model.get(model)

    def set(self, model: str, tokenizer: LocalTokenizer | None) -> None:
        self._by_model[model] = tokenizer

    async def ensure(self, model: str, root: str | None) -> None:
        root = self._paths.get(model, root)
        fingerprint = None
        if root is not None and has_local_tokenizer(root):
            paths = [Path(root, name) for name in _TOKENIZER_FILES]
            stats = tuple(_stat(path) for path in paths)  # a few stats per health check: on the loop
            cached = self._stats.get(root)
            if cached is not None and cached[0] == stats:
                fingerprint = cached[1]
            else:  # new or changed files: hashed off the loop
                fingerprint = await asyncio.to_thread(_hash_files, paths, stats)
                if fingerprint is not None:
                    self._stats[root] = (stats, fingerprint)
        if root is None or fingerprint is None:  # a path on another machine: keep what counts (maybe another worker's)
            self._by_model.setdefault(model, None)
            return
        if fingerprint == self._prints.get(model):
            return
        if fingerprint in self._failed:  # tried once: the worker counts
            self._by_model[model] = None
            self._prints.pop(model, None)
            return
        seen = self._seen.setdefault(model, {})
        if fingerprint in seen and model not in self._warned:  # back to one it left: workers that disagree
            log.warning("workers report different tokenizers for model %s (%s): prompts are counted with the "
                        "tokenizer of the worker checked last, which may not be the one a request reaches; serve "
                        "different models under different names", model, ", ".join(sorted(seen.values())))
            self._warned.add(model)
        seen.setdefault(fingerprint, root)
        tok = self._loaded.pop(fingerprint, None)
        if tok is None:
            try:
                tok = await asyncio.shield(self._load(fingerprint, root))
            except Exception:  # an unreadable tokenizer (logged once): the worker's /tokenize counts
                self._by_model[model] = None
                self._prints.pop(model, None)
                return
        self._loaded[fingerprint] = tok
        self._prints[model] = fingerprint
        self._by_model[model] = tok
        in_use = set(self._prints.values())
        for old in [fp for fp in self._loaded if fp not in in_use][:max(0, len(self._loaded) - _KEEP_LOADED)]:
            del self._loaded[old]

    def _load(self, fingerprint: str, root: str) -> asyncio.Future[LocalTokenizer]:
        """One load per fingerprint at a time, in a thread: workers checked at once share it, and a check cancelled
        meanwhile (a timeout) does not cancel it for the others."""
        fut = self._loading.get(fingerprint)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self._loader, root))
            self._loading[fingerprint] = fut

            def done(f: asyncio.Future[LocalTokenizer]) -> None:
                self._loading.pop(fingerprint, None)
                exc = None if f.cancelled() else f.exception()
                if exc is not None:
                    self._failed.add(fingerprint)
                    log.warning("could not load the tokenizer in %s; prompts are counted by the worker", root,
                                exc_info=exc)

            fut.add_done_callback(done)
        return fut


def _hash_files(paths: list[Path], stats: tuple[tuple[int, int] | None, ...]) -> str | None:
    """sha256 of a tokenizer's files (a missing one counts too), or None when one can't be read."""
    digest = hashlib.sha256()
    try:
        for path, stat in zip(paths, stats, strict=True):
            digest.update(b"\0" if stat is None else b"\1" + path.read_bytes() + b"\0")
    except OSError:
        return None
    return digest.hexdigest()


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
