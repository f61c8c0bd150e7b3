"""A worker killed under load (bench/chaos.py at a small scale): every stream ends in [DONE] or one in-band
error event — none truncated, none hanging — and requests after the kill go to the surviving worker."""

from __future__ import annotations

from pathlib import Path

from bench.chaos import run_chaos


def test_a_worker_killed_under_load_truncates_nothing(tmp_path: Path) -> None:
    result = run_chaos(streams=150, duration=6.0, kill_at=2.5, tokens=30, token_delay=0.04, log_dir=tmp_path)
    outcomes = result["outcomes"]
    assert result["gateway_alive"]
    assert outcomes.get("truncated", 0) == 0, result["examples"]
    assert outcomes.get("timeout", 0) == 0, result["examples"]
    # streams on the killed worker were cut: each said so in-band
    assert outcomes.get("error_event", 0) >= 1
    assert "worker_disconnected" in result["examples"]["error_event"]
    # requests after the kill were retried on the survivor (prompt counting included), never refused
    assert outcomes.get("http_error", 0) == 0, result["examples"]
    assert outcomes["done"] > outcomes.get("error_event", 0)
    assert result["workers_ready_after"].count(True) == 1
