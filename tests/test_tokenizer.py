"""A long prompt counted in pieces (on several cores) must give exactly the count of the whole text — for each kind
of tokenizer it is allowed for — and every other kind must not be cut at all."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from app.tokenizer import _CUTTABLE_SPLITS, LocalTokenizer, _cut, _cuttable

LLAMA3, QWEN2 = sorted(_CUTTABLE_SPLITS, key=lambda p: "{1,3}" not in p)
SPECIALS = ["<|bos|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["river", "stone", "Bridge", "über", "naïve", "東京", "данные", "x", "I'm", "don't", "42", "3.14", "1234567",
         "a_b", "e-mail", "ok!", "(paren)", "¿qué?", "²", "ⅻ", "🙂", "\t", "\n", "  ", "\r\n", " \n ", "<|im_start|>",
         "<|im_end|>", "user", "'s", "…", "--", "/path/to", "can't"]


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)]


def _train(pre: Any, tmp: Path, name: str, *, normalizer: Any = None, bos_post: bool = False) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(7), trainer)
    if bos_post:
        from tokenizers import processors
        tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    out = tmp / name
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tokenizers")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)

    def split_then_bytes(pattern: str) -> Any:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    return {
        "gpt2": _train(byte_level, tmp, "gpt2", bos_post=True),
        "llama3": _train(split_then_bytes(LLAMA3), tmp, "llama3"),
        "qwen2": _train(split_then_bytes(QWEN2), tmp, "qwen2"),
        "metaspace": _train(pre_tokenizers.Metaspace(), tmp, "metaspace"),
        "nfkc": _train(byte_level, tmp, "nfkc", normalizer=normalizers.NFKC()),
        "other_regex": _train(split_then_bytes(r"\w+|[^\w]"), tmp, "other_regex"),
    }


def _json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "tokenizer.json").read_text())
    return data


def test_only_byte_level_bpes_with_known_patterns_are_cut(models_dir: dict[str, Path]) -> None:
    verdict = {name: _cuttable(_json(path)) for name, path in models_dir.items()}
    assert verdict == {"gpt2": True, "llama3": True, "qwen2": True, "metaspace": False, "nfkc": False,
                       "other_regex": False}
    stripping = _json(models_dir["gpt2"])
    stripping["added_tokens"][1]["lstrip"] = True  # an added token that eats the space before it
    assert not _cuttable(stripping)
    spaced = _json(models_dir["gpt2"])
    spaced["added_tokens"][1]["content"] = "<| im_start |>"
    assert not _cuttable(spaced)


def test_cuts_fall_before_a_space_between_a_word_and_a_letter() -> None:
    text = "alpha beta, gamma 12 delta  epsilon\nzeta"
    parts = _cut(text, 4)
    assert "".join(parts) == text and len(parts) > 1
    for part in parts[1:]:
        assert part[0] == " " and part[1].isalpha()
    assert _cut("no-spaces-at-all", 3) == ["no-spaces-at-all"]


texts = st.lists(st.one_of(st.sampled_from(WORDS), st.text(min_size=1, max_size=6)), min_size=1, max_size=120).map(
    lambda ws: " ".join(ws))


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts, pieces=st.integers(2, 8), special=st.booleans())
def test_a_count_in_pieces_equals_the_count_of_the_whole(models_dir: dict[str, Path], name: str, text: str,
                                                         pieces: int, special: bool) -> None:
    whole = Tokenizer.from_file(str(models_dir[name] / "tokenizer.json"))
    cut = LocalTokenizer(models_dir[name], piece_chars=1, max_pieces=pieces)
    assert cut.count(text, add_special_tokens=special) == len(whole.encode(text, add_special_tokens=special).ids)


@pytest.mark.parametrize("name", ["metaspace", "nfkc", "other_regex"])
def test_tokenizers_that_may_not_be_cut_count_the_whole_text(models_dir: dict[str, Path], name: str) -> None:
    text = " ".join(_corpus(3)[:20])
    whole = Tokenizer.from_file(str(models_dir[name] / "tokenizer.json"))
    cut = LocalTokenizer(models_dir[name], piece_chars=1, max_pieces=8)
    assert cut.count(text, add_special_tokens=False) == len(whole.encode(text, add_special_tokens=False).ids)


def test_a_truncation_or_padding_in_tokenizer_json_is_not_applied(models_dir: dict[str, Path], tmp_path: Path) -> None:
    """transformers (and so vLLM) counts a prompt whole; a tokenizer.json may still carry truncation/padding."""
    data = _json(models_dir["gpt2"])
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 4096}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "<|bos|>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    text = " ".join(_corpus(5)[:10])
    expected = len(Tokenizer.from_file(str(models_dir["gpt2"] / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids)
    assert expected > 8
    for pieces in (1, 4):
        tok = LocalTokenizer(tmp_path, piece_chars=1, max_pieces=pieces)
        assert tok.count(text, add_special_tokens=False) == expected


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []}],
    [{"role": "user", "content": 5}],
])
def test_a_template_that_fails_on_the_messages_is_a_template_error(tmp_path: Path,
                                                                    messages: list[dict[str, Any]]) -> None:
    from app.tinymodel import build_tiny_model
    from app.tokenizer import TemplateError

    root = build_tiny_model(tmp_path / "m")
    # Qwen/ChatML-style string concatenation: a TypeError in the template's own Python (was a 500)
    (root / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}")
    tok = LocalTokenizer(root)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<|user|>hi"
    with pytest.raises(TemplateError, match="TypeError"):
        tok.render_chat(messages)


def test_the_template_sees_what_vllm_hands_every_template(tmp_path: Path) -> None:
    """transformers passes tools and documents, vLLM reasoning_effort, each None when the request has none: a
    template that asks "is defined" (or "is none") renders as vLLM renders it."""
    from app.tinymodel import build_tiny_model

    root = build_tiny_model(tmp_path / "m")
    (root / "chat_template.jinja").write_text(
        "{% for v in [tools, documents, reasoning_effort] %}{{ 'N' if v is none else 'X' }}{% endfor %}"
        "{{ 'D' if reasoning_effort is defined else 'U' }}{{ messages[0]['content'] }}")
    assert LocalTokenizer(root).render_chat([{"role": "user", "content": "hi"}]) == "NNNDhi"


# --- the store: one load per tokenizer, whatever the paths ------------------------------------------------------------

class _CountingLoader:
    def __init__(self) -> None:
        self.loads: list[str] = []

    def __call__(self, root: str) -> LocalTokenizer:
        self.loads.append(root)
        return LocalTokenizer(root)


def _models(tmp_path: Path) -> tuple[str, str, str]:
    """Two copies of one tokenizer (other paths, other mtimes) and a third whose chat template differs."""
    import shutil

    from app.tinymodel import build_tiny_model

    a = build_tiny_model(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    return str(a), str(b), str(c)


def test_workers_serving_one_model_from_two_copies_share_one_load(tmp_path: Path) -> None:
    import asyncio

    from app.tokenizer import TokenizerStore

    a, b, _ = _models(tmp_path)
    loader = _CountingLoader()
    store = TokenizerStore(loader=loader)

    async def checks() -> None:  # two workers' health checks, one after the other, again and again
        for _ in range(5):
            await store.ensure("m", a)
            await store.ensure("m", b)
            await store.ensure("m", "/on/another/machine")  # a remote worker: not readable here

    asyncio.run(checks())
    assert loader.loads == [a]  # it had been reloaded on every check whose path differed from the one before
    tok = store.get("m")
    assert tok is not None and tok.render_chat([{"role": "user", "content": "hi"}]).startswith("<|")


def test_a_worker_on_another_version_of_the_model_brings_its_tokenizer(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from app.tokenizer import TokenizerStore

    a, _, c = _models(tmp_path)
    loader = _CountingLoader()
    store = TokenizerStore(loader=loader)
    hi = [{"role": "user", "content": "hi"}]

    asyncio.run(store.ensure("m", a))
    first = store.get("m")
    assert first is not None and first.render_chat(hi).startswith("<|")
    asyncio.run(store.ensure("m", c))  # restarted on a new version: its template counts from now on
    second = store.get("m")
    assert second is not None and second.render_chat(hi) == "[hi]"
    assert loader.loads == [a, c] and not caplog.records

    for _ in range(3):  # two workers that disagree: each tokenizer loaded once, and one warning
        asyncio.run(store.ensure("m", a))
        asyncio.run(store.ensure("m", c))
    assert loader.loads == [a, c]
    assert store.get("m") is second
    warnings = [r for r in caplog.records if "different tokenizers for model m" in r.getMessage()]
    assert len(warnings) == 1 and a in warnings[0].getMessage() and c in warnings[0].getMessage()


def test_a_tokenizer_whose_files_change_in_place_is_loaded_again(tmp_path: Path) -> None:
    import asyncio
    import os

    from app.tokenizer import TokenizerStore

    a, _, _ = _models(tmp_path)
    loader = _CountingLoader()
    store = TokenizerStore(loader=loader)
    asyncio.run(store.ensure("m", a))
    asyncio.run(store.ensure("m", a))
    assert loader.loads == [a]
    (Path(a) / "chat_template.jinja").write_text("{% for m in messages %}({{ m['content'] }}){% endfor %}")
    os.utime(Path(a) / "chat_template.jinja", ns=(1, 1))  # another mtime, whatever the clock's resolution
    asyncio.run(store.ensure("m", a))  # the worker restarted on the updated model, same path
    tok = store.get("m")
    assert tok is not None and tok.render_chat([{"role": "user", "content": "hi"}]) == "(hi)"
    assert loader.loads == [a, a]


def test_a_tokenizer_that_does_not_load_is_tried_once_and_the_worker_counts(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    from app.tokenizer import TokenizerStore

    a, _, _ = _models(tmp_path)
    (Path(a) / "tokenizer.json").write_text("{not json")
    loader = _CountingLoader()
    store = TokenizerStore(loader=loader)
    for _ in range(3):
        asyncio.run(store.ensure("m", a))
    assert store.get("m") is None and loader.loads == [a]
    assert len([r for r in caplog.records if "could not load the tokenizer" in r.getMessage()]) == 1


def test_workers_checked_at_once_share_one_load(tmp_path: Path) -> None:
    import asyncio
    import time

    from app.tokenizer import TokenizerStore

    a, b, _ = _models(tmp_path)
    loads: list[str] = []

    def slow(root: str) -> LocalTokenizer:
        loads.append(root)
        time.sleep(0.2)  # a big tokenizer.json: the other worker's check arrives meanwhile
        return LocalTokenizer(root)

    store = TokenizerStore(loader=slow)

    async def checks() -> None:
        first = asyncio.ensure_future(store.ensure("m", a))
        await asyncio.sleep(0.05)
        first.cancel()  # the first check timed out: the load goes on for the second
        await asyncio.gather(store.ensure("m", b), return_exceptions=True)

    asyncio.run(checks())
    assert len(loads) == 1 and store.get("m") is not None
