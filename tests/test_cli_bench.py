"""``tokengate bench``, driven through argparse the way app/cli.py dispatches (``args.func(args)``), against the
fake worker on loopback."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.cli import build_parser
from app.cli_bench import add_bench_parser
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .utils import run_gateway


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tokengate")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = parse(argv)
    rc: int = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def worker() -> Iterator[ThreadedFakeWorker]:
    with ThreadedFakeWorker(ttft=0.02, token_delay=0.005, model="tiny", max_model_len=600) as w:
        yield w


def small(w: ThreadedFakeWorker, out: Path, *extra: str) -> list[str]:
    return ["--url", w.url, "--model", "tiny", "--concurrency", "1,2", "--prompt-tokens", "64",
            "--output-tokens", "4", "--requests", "4", "--out", str(out), "--no-progress", *extra]


def test_defaults_and_flags() -> None:
    a = parse(["--url", "http://h:1", "--model", "m"])
    assert (a.concurrency, a.prompt_tokens, a.output_tokens) == ([1, 8, 32, 128], [128, 1024, 8192], [64, 256])
    assert (a.duration, a.requests, a.request_rate, a.goodput, a.chat, a.ignore_eos, a.progress, a.json) == (
        None, None, None, None, True, True, True, False)
    a = parse(["--url", "u", "--model", "m", "--concurrency", "4,16", "--prompt-tokens", "1k", "--duration", "5",
               "--request-rate", "2.5", "--goodput", "ttft:500ms,tpot:50ms", "--completions", "--no-ignore-eos",
               "--api-key", "k", "--tokenizer", "/x", "--json"])
    assert (a.concurrency, a.prompt_tokens, a.duration, a.request_rate) == ([4, 16], [1024], 5.0, 2.5)
    assert (a.goodput, a.chat, a.ignore_eos, a.api_key, a.tokenizer, a.json) == (
        {"ttft": 0.5, "tpot": 0.05}, False, False, "k", "/x", True)


@pytest.mark.parametrize("argv", [
    ["--concurrency", "0"], ["--prompt-tokens", "x"], ["--goodput", "speed:1ms"],
    ["--duration", "1", "--requests", "2"], ["--chat", "--completions"], ["--duration", "soon"],
])
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--url", "u", "--model", "m", *argv])
    assert exc.value.code == 2
    capsys.readouterr()


def test_the_tokengate_command_has_bench() -> None:
    args = build_parser().parse_args(["bench", "--url", "http://h:1", "--model", "m"])
    assert args.func.__name__ == "cmd_bench"


def test_json_run_against_the_fake_worker(worker: ThreadedFakeWorker, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(small(worker, tmp_path, "--json", "--goodput", "ttft:1s"), capsys)
    assert rc == 0, err
    summary: dict[str, Any] = json.loads(out)
    assert [(s["concurrency"], s["prompt_tokens"], s["output_tokens"]) for s in summary["shapes"]] == [
        (1, 64, 4), (2, 64, 4)]
    for s in summary["shapes"]:
        assert (s["requests"], s["completed"], s["failed"]) == (4, 4, 0)
        assert s["goodput"] == s["request_throughput"] > 0
        assert s["ttft_ms"]["p50"] >= 15 and s["output_tokens_actual"]["max"] == 4
    assert summary["prompts"]["source"] == "server /tokenize"  # /v1/models' root is not on this machine
    assert summary["config"]["goodput"] == {"ttft": 1000.0} and summary["server"]["max_model_len"] == 600
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.md", "report.html", "requests.jsonl"}
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 8
    assert json.loads((tmp_path / "results.json").read_text())["shapes"] == summary["shapes"]


def test_table_run_with_completions_and_skipped_shapes(worker: ThreadedFakeWorker, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = small(worker, tmp_path, "--completions", "--prompt-tokens", "64,1024", "--no-ignore-eos")
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert out.startswith("| conc |") and "report.html" in out
    assert "skipped c=1 in=1024 out=4: 1028 tokens exceed the server's max_model_len 600" in out
    sent = worker.received[-1] if worker.received else None
    assert sent is not None and sent.path == "/v1/completions" and "ignore_eos" not in sent.json()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib comes with make install


@pytest.mark.parametrize("argv", [["--duration", "0"], ["--duration", "-1"], ["--duration", "nan"],
                                  ["--request-rate", "nan"], ["--request-rate", "0"], ["--timeout", "0"],
                                  ["--requests", "0"]])
def test_numbers_out_of_range_exit_2_before_any_request(argv: list[str], worker: ThreadedFakeWorker, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    base = small(worker, tmp_path)
    i = base.index("--requests")
    del base[i:i + 2]
    rc, _, err = run([*base, *argv], capsys)
    assert rc == 2 and f"{argv[0]} must be" in err
    assert not worker.received and not (tmp_path / "results.json").exists()


def test_a_refused_model_stops_at_the_probe(worker: ThreadedFakeWorker, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with run_gateway(Settings(upstream=[worker.url]), ready_timeout=20) as gw:
        rc, _, err = run(small(worker, tmp_path, "--url", gw.url, "--model", "nosuch"), capsys)
    assert rc == 1 and "refused the probe request (http_404" in err and "--model" in err
    assert not [r for r in worker.received if r.path == "/v1/chat/completions"]  # nothing reached the worker
    assert not (tmp_path / "results.json").exists()


def test_rate_inf_is_written_as_vllm_writes_it_and_vllm_names_are_there(worker: ThreadedFakeWorker, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(small(worker, tmp_path, "--json", "--request-rate", "inf", "--concurrency", "8"), capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["config"]["request_rate"] == "inf" and "all at once" in summary["config"]["mode"]
    s = summary["shapes"][0]
    assert s["request_rate"] == "inf" and s["max_concurrency"] == 4  # --requests 4 caps the 8 in flight
    assert "below concurrency 8" in err
    assert s["median_ttft_ms"] == s["ttft_ms"]["p50"] and s["p99_e2el_ms"] == s["e2e_ms"]["p99"]
    assert s["mean_itl_ms"] == s["itl_ms"]["mean"] and s["std_tpot_ms"] is not None
    assert (s["completed_requests"], s["total_output_tokens"]) == (4, 16) and s["request_goodput"] is None


def test_a_shape_with_no_success_exits_1_and_says_why(worker: ThreadedFakeWorker, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(upstream=[worker.url], max_tokens_cap=8, cap_policy="reject")
    with run_gateway(settings, ready_timeout=20) as gw:
        rc, _, err = run(small(worker, tmp_path, "--url", gw.url, "--output-tokens", "4,16"), capsys)
    assert rc == 1
    assert "no request succeeded in 2 of 4 shapes (c=1 in=64 out=16, c=2 in=64 out=16)" in err
    assert "c=1 in=64 out=16: 4 of 4 requests failed:" in err and "4 × http_400" in err
    assert json.loads((tmp_path / "results.json").read_text())["shapes"][0]["completed"] == 4  # out=4 ran


def test_without_a_tokenize_route_prompts_are_sized_by_the_servers_usage(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with ThreadedFakeWorker(model="tiny", max_model_len=600, record=True) as w:
        w.options.tokenize = False
        rc, out, err = run(small(w, tmp_path, "--json", "--concurrency", "1"), capsys)
        probes = [b for q in w.received or () if q.path == "/v1/chat/completions"
                  and (b := q.json())["max_tokens"] == 1]
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["prompts"]["source"] == "server usage" and summary["prompts"]["exact"]
    assert summary["shapes"][0]["prompt_tokens_actual"] == {"mean": 64.0, "min": 64, "max": 64}
    assert probes and all(p["stream"] is False for p in probes)  # one-token, unstreamed counting requests


def test_no_prompt_is_sent_twice_across_shapes_the_probe_or_runs(worker: ThreadedFakeWorker, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Shapes of one prompt length numbered their prompts from 0 alike, and a re-run sent the same again: vLLM's
    prefix cache served them, and TTFT fell with concurrency."""
    def prompts_of_a_run(out: Path) -> list[str]:
        before = len(worker.received)
        rc, _, err = run(small(worker, out), capsys)
        assert rc == 0, err
        return [q.json()["messages"][0]["content"] for q in list(worker.received)[before:]
                if q.path == "/v1/chat/completions"]

    first, second = prompts_of_a_run(tmp_path / "a"), prompts_of_a_run(tmp_path / "b")
    assert len(first) == len(second) == 1 + 2 * 4  # the probe, then two shapes of four requests
    assert len(set(first)) == len(first) and not set(first) & set(second)


def test_a_bad_out_is_refused_before_any_request(worker: ThreadedFakeWorker, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("")
    for out, said in ((taken, "not a directory"), (taken / "below", "Not a directory")):
        rc, _, err = run(small(worker, out), capsys)
        assert rc == 2 and f"--out {out}" in err and said in err and "Traceback" not in err, err
    assert not [q for q in worker.received if q.path == "/v1/chat/completions"]  # no run lost to it


def test_a_pipe_closed_early_ends_quietly() -> None:
    """`tokengate presets list | head -1`: the reader goes away before the writer has written (here: before it
    starts, so every write meets a closed pipe) — an exit status, no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "presets", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_sigterm_writes_the_shapes_done_as_ctrl_c_does(worker: ThreadedFakeWorker, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    argv = [sys.executable, "-m", "app.cli", "bench", "--url", worker.url, "--model", "tiny", "--concurrency", "1,2,4",
            "--prompt-tokens", "32", "--output-tokens", "2", "--duration", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    with proc.stderr:
        for line in proc.stderr:
            if "[1/3]" in line:  # the first shape is done
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
    assert proc.wait(60) == 130 and "Traceback" not in rest, rest
    shapes = json.loads((tmp_path / "results.json").read_text())["shapes"]
    assert 1 <= len(shapes) < 3 and shapes[0]["completed"] > 0


def test_nothing_listening_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run(["--url", f"http://127.0.0.1:{port}", "--model", "m", "--requests", "1", "--out",
                      str(tmp_path), "--no-progress"], capsys)
    assert rc == 1 and "cannot connect" in err
    assert "approximate" not in err  # the cause first: not a side effect of it


def test_bad_input_exits_2(worker: ThreadedFakeWorker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(small(worker, tmp_path, "--tokenizer", str(tmp_path)), capsys)
    assert rc == 2 and "no tokenizer.json" in err
    rc, _, err = run(small(worker, tmp_path, "--prompt-tokens", "2"), capsys)
    assert rc == 2 and "shorter than the smallest prompt" in err


def test_progress_goes_to_stderr(worker: ThreadedFakeWorker, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a for a in small(worker, tmp_path, "--json") if a != "--no-progress"]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "[2/2] c=2 in=64 out=4" in err and "4 done 0 err" in err
    json.loads(out)  # stdout stays pure JSON
