"""bench/compare.py's options that change what the tokengate arm runs."""

from __future__ import annotations

from pathlib import Path

from bench import peers
from bench.compare import parse_args


def test_tokengate_count_defaults_to_the_worker_and_accepts_local() -> None:
    assert parse_args([]).tokengate_count == "remote"
    assert parse_args(["--tokengate-count", "local"]).tokengate_count == "local"


def test_tokengate_arm_passes_its_extra_flags(tmp_path: Path) -> None:
    launch = peers.tokengate(8123, "http://127.0.0.1:8001", ["--tokenizer", "tiny=/m"], src=tmp_path)
    cmd = launch.cmd
    assert cmd[cmd.index("--upstream") + 1] == "http://127.0.0.1:8001"
    assert cmd[cmd.index("--tokenizer") + 1] == "tiny=/m"
    assert launch.env is not None and launch.env["PYTHONPATH"] == str(tmp_path)
