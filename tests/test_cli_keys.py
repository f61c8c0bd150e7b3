from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import pytest

from app.auth import PRIORITIES, hash_key, load_keys
from app.cli_keys import EXIT_BAD_INPUT, add_keys_parser
from app.limits import Limits


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tokengate")
    add_keys_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _create(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert _main(["keys", "create", *argv]) == 0
    out = capsys.readouterr().out
    keys = re.findall(r"^\s+(tg-\S+)$", out, re.MULTILINE)
    assert len(keys) == 1, out
    return keys[0], out[out.index("keys:\n") :]


def test_create_prints_the_key_once_and_a_loadable_snippet_with_its_hash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key, snippet = _create(
        capsys,
        *("--name", "alice", "--rpm", "60", "--tpm", "10000", "--max-concurrent", "4"),
        *("--regions", "fr,uae", "--models", "m1,m2", "--priority", "high", "--max-tokens-cap", "512"),
    )
    assert key not in snippet and hash_key(key) in snippet
    path = tmp_path / "keys.yaml"
    path.write_text(snippet)
    principal = load_keys(path).authenticate(f"Bearer {key}")
    assert principal.name == "alice"
    assert principal.limits == Limits(rpm=60, tpm=10000, max_concurrent=4)
    assert principal.regions == frozenset({"fr", "uae"}) and principal.models == frozenset({"m1", "m2"})
    assert principal.priority == PRIORITIES["high"] and principal.caps.max_tokens_cap == 512


def test_create_says_the_key_will_not_be_shown_again(capsys: pytest.CaptureFixture[str]) -> None:
    _main(["keys", "create"])
    out = capsys.readouterr().out
    assert "will not be shown again" in out
    assert re.search(r"name: key-[0-9a-f]{8}", out)


def test_snippets_append_under_an_existing_keys_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key_a, snippet_a = _create(capsys, "--name", "a")
    key_b, snippet_b = _create(capsys, "--name", "b", "--models", "x")
    path = tmp_path / "keys.yaml"
    path.write_text(snippet_a + snippet_b.removeprefix("keys:\n"))
    store = load_keys(path)
    assert store.authenticate(f"Bearer {key_a}").name == "a"
    assert store.authenticate(f"Bearer {key_b}").models == frozenset({"x"})


def test_each_key_is_new(capsys: pytest.CaptureFixture[str]) -> None:
    assert _create(capsys, "--name", "a")[0] != _create(capsys, "--name", "a")[0]


def test_bad_name_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["keys", "create", "--name", "no spaces please"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "name" in captured.err and "tg-" not in captured.out


@pytest.mark.parametrize("argv", [["--rpm", "0"], ["--tpm", "x"], ["--priority", "urgent"], ["--regions", ","]])
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _main(["keys", "create", *argv])
    assert info.value.code == 2
    assert "tg-" not in capsys.readouterr().out


def test_hash_reads_the_key_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("tg-abc\n"))
    assert _main(["keys", "hash"]) == 0
    assert capsys.readouterr().out == hash_key("tg-abc") + "\n"


def test_hash_of_nothing_is_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert _main(["keys", "hash"]) == EXIT_BAD_INPUT
    assert "no key" in capsys.readouterr().err
