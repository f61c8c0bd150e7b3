"""app/loadtest: the driver against the fake worker (known delays, faults), the stats math, prompts, report files,
and one run against the real CPU engine with the model's own tokenizer."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.cli_bench import add_bench_parser
from app.loadtest.charts import ChartSpec, svg_chart
from app.loadtest.client import Driver, Endpoint, RequestResult, RunResult, _Conn
from app.loadtest.report import (
    BRIEF,
    distribution_ms,
    meets,
    parse_goodput,
    percentile,
    render_table,
    series,
    summarize_shape,
    tpot,
    write_reports,
)
from app.loadtest.shapes import (
    NONCE_SPACE,
    EstimateCounter,
    ModelInfo,
    PromptSet,
    Shape,
    body_factory,
    build_prompts,
    fetch_model_info,
    parse_int_list,
    shape_grid,
)
from app.settings import Settings
from bench.fakeworker import ThreadedFakeWorker

from .conftest import Engine
from .utils import run_gateway

SHAPE = Shape(2, 64, 10)


def _prompts(target: int = 64) -> PromptSet:
    counter = EstimateCounter(chat=True)
    return build_prompts(target, counter, ["alpha", "beta", "gamma", "delta", "omega"])


def drive(url: str, *, output_tokens: int = 10, chat: bool = True, timeout: float = 30.0,
          **run: Any) -> RunResult:
    body = body_factory(_prompts(), model="tiny", output_tokens=output_tokens, chat=chat, ignore_eos=True)
    driver = Driver(Endpoint.parse(url, chat=chat), body, timeout=timeout)
    return asyncio.run(driver.run(**run))


# --- the driver on known delays -----------------------------------------------------------------------------------

def test_stats_match_the_fake_workers_delays() -> None:
    with ThreadedFakeWorker(ttft=0.05, token_delay=0.01) as w:
        run = drive(w.url, concurrency=2, requests=6)
    s = summarize_shape(SHAPE, run)
    assert (s["requests"], s["completed"], s["failed"]) == (6, 6, 0)
    assert s["output_tokens_actual"] == {"mean": 10.0, "min": 10, "max": 10}  # from usage
    assert s["usage_reported"] == 1.0
    assert 45 <= s["ttft_ms"]["p50"] <= 75
    assert 8 <= s["itl_ms"]["p50"] <= 15
    assert 8 <= s["tpot_ms"]["p50"] <= 15
    assert 135 <= s["e2e_ms"]["p50"] <= 200  # 50 ms + 9 × 10 ms
    assert set(s["ttft_ms"]) == {"mean", "p50", "p90", "p95", "p99"}
    assert s["request_throughput"] == pytest.approx(6 / s["duration_s"], rel=0.01)
    assert s["output_throughput"] == pytest.approx(60 / s["duration_s"], rel=0.01)
    # every gap pooled: the role chunk and the 10 content chunks are 11 chunks with choices (vLLM's count)
    assert len([g for r in run.records for g in r.itl]) == 6 * 10


class _Sink:
    """A transport that keeps what is written (the request) and nothing else."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def test_timing_follows_vllm_bench_serve() -> None:
    """TTFT at the first chunk with choices (the role chunk), ITL between chunks with choices, E2E at the last
    of them: the usage chunk and [DONE] that follow don't stretch it."""
    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    async def main() -> RequestResult:
        conn = _Conn()
        conn.connection_made(_Sink())  # type: ignore[arg-type]
        fut = conn.send(b"POST / HTTP/1.1\r\n\r\n", start=100.0)
        steps = [
            (100.0, b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"),
            (100.1, event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
            (100.1, event({"choices": [{"index": 0, "delta": {"content": "a"}}]})),
            (100.3, event({"choices": [{"index": 0, "delta": {"content": "b"}}]})),
            (100.6, event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})),
            (100.9, b"data: [DONE]\n\n"),
        ]
        for now, data in steps:
            conn._now = now
            if data.startswith(b"HTTP"):
                conn.parser.feed_data(data)
            else:
                conn.parser.feed_data(b"%x\r\n%b\r\n" % (len(data), data))
        conn.parser.feed_data(b"0\r\n\r\n")
        return await fut

    rec = asyncio.run(main())
    assert rec.ok and rec.ttft == pytest.approx(0.1)
    assert rec.itl == pytest.approx([0.0, 0.2])
    assert rec.e2e == pytest.approx(0.3)
    assert (rec.chunks, rec.output_tokens, rec.prompt_tokens) == (2, 2, 7)


def test_completions_endpoint_and_chunk_count_without_usage() -> None:
    with ThreadedFakeWorker(tokens=5) as w:
        run = drive(w.url, chat=False, concurrency=1, requests=2)
        sent = w.received[-1].json() if w.received else {}
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 10 and sent["ignore_eos"]
    assert all(r.ok and r.tokens == 5 and r.output_tokens == 5 for r in run.records)
    rec = RequestResult(0.0, ttft=0.1, e2e=0.5, chunks=5)  # no usage: content chunks count
    assert rec.tokens == 5 and tpot(rec) == pytest.approx(0.1)


def test_each_request_has_a_distinct_prompt() -> None:
    with ThreadedFakeWorker(tokens=1) as w:
        drive(w.url, concurrency=1, requests=5)
        contents = [r.json()["messages"][0]["content"] for r in w.received or []]
    assert len(contents) == 5 and len(set(contents)) == 5


def test_open_loop_caps_in_flight_at_concurrency() -> None:
    with ThreadedFakeWorker(ttft=0.1, tokens=1) as w:
        run = drive(w.url, concurrency=1, requests=4, rate=1000.0)
    assert len(run.records) == 4 and all(r.ok for r in run.records)
    starts = sorted(r.start for r in run.records)
    assert all(b - a >= 0.09 for a, b in zip(starts, starts[1:], strict=False))  # one at a time


def test_an_open_loop_sends_its_first_request_at_once() -> None:
    """As vLLM's bench serve does: a Poisson gap before the first send made a low-rate run's req/s too high (the
    duration ran from a first send that came late)."""
    with ThreadedFakeWorker(tokens=1) as w:
        t0 = time.perf_counter()
        run = drive(w.url, concurrency=1, requests=1, rate=0.1, seed=1)  # a mean gap of 10 s
    assert len(run.records) == 1 and run.records[0].start - t0 < 1.0


def test_duration_stops_sending_and_finishes_in_flight() -> None:
    with ThreadedFakeWorker(ttft=0.05, tokens=1) as w:
        run = drive(w.url, concurrency=2, duration=0.3)
    assert 4 <= len(run.records) <= 16 and all(r.ok for r in run.records)
    assert run.duration >= 0.3


# --- errors -------------------------------------------------------------------------------------------------------

def test_http_errors_are_counted_by_status() -> None:
    with ThreadedFakeWorker(status=503) as w:
        run = drive(w.url, concurrency=2, requests=5)
    s = summarize_shape(SHAPE, run)
    assert (s["completed"], s["failed"], s["errors"]) == (0, 5, {"http_503": 5})
    assert "injected error 503" in s["error_samples"]["http_503"]
    assert s["ttft_ms"]["p50"] is None and s["request_throughput"] == 0


@pytest.mark.parametrize(("options", "kind"), [
    ({"fail_after_chunks": 2}, "connection_closed"),
    ({"malformed": True}, "bad_event"),
    ({"stall_after_chunks": 1}, "timeout"),
])
def test_stream_faults_are_counted_by_kind(options: dict[str, Any], kind: str) -> None:
    with ThreadedFakeWorker(**options) as w:
        run = drive(w.url, concurrency=1, requests=2, timeout=0.5)
    assert [r.error for r in run.records] == [kind, kind]


def test_in_band_error_event_fails_the_request() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        body = (b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
                b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}\n\n'
                b"data: [DONE]\n\n")
        reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(body),
                                                                                                           body)

        async def go() -> RunResult:
            loop = asyncio.get_running_loop()

            def serve() -> None:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

            server = loop.run_in_executor(None, serve)
            driver = Driver(Endpoint.parse(f"http://127.0.0.1:{port}"),
                            body_factory(_prompts(), model="m", output_tokens=4, chat=True, ignore_eos=False))
            result = await driver.run(concurrency=1, requests=1)
            await server
            return result

        rec = asyncio.run(go()).records[0]
    assert (rec.error, rec.detail, rec.ttft is not None) == ("stream_error", "engine died", True)


def _one_reply(body: bytes) -> RequestResult:
    """One request against a server that answers it with this SSE body."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%b" % (
            len(body), body)

        async def go() -> RunResult:
            def serve() -> None:
                conn, _ = srv.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

            server = asyncio.get_running_loop().run_in_executor(None, serve)
            driver = Driver(Endpoint.parse(f"http://127.0.0.1:{port}"),
                            body_factory(_prompts(), model="m", output_tokens=4, chat=True, ignore_eos=False))
            result = await driver.run(concurrency=1, requests=1)
            await server
            return result

        return asyncio.run(go()).records[0]


@pytest.mark.parametrize("choices", [b'{"0": {"text": "a"}}', b"5", b'"abc"'])
def test_events_of_another_shape_are_not_counted_and_break_nothing(choices: bytes) -> None:
    rec = _one_reply(b'data: {"choices":%b}\n\ndata: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
                     b"data: [DONE]\n\n" % choices)
    assert (rec.error, rec.chunks) == (None, 1)


@pytest.mark.parametrize("answer", [b'{"data": 5}', b"null", b"[1]", b'{"data": [1, {"id": "m", "root": 3}]}'])
def test_a_models_answer_of_another_shape_is_no_model_info(answer: bytes) -> None:
    client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=answer)))
    assert fetch_model_info(client, "http://x", "m") == ModelInfo()


def test_connection_refused_is_counted() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = drive(f"http://127.0.0.1:{port}", concurrency=1, requests=2)
    assert [r.error for r in run.records] == ["connect", "connect"]


# --- stats math ---------------------------------------------------------------------------------------------------

def test_percentiles_interpolate_like_numpy() -> None:
    v = [float(i) for i in range(1, 101)]
    assert percentile(v, 50) == 50.5 and percentile(v, 99) == pytest.approx(99.01)
    d = distribution_ms([0.01, 0.02, 0.03, 0.04])
    assert d == {"mean": 25.0, "p50": 25.0, "p90": 37.0, "p95": 38.5, "p99": 39.7}
    assert distribution_ms([])["p99"] is None


def test_goodput_counts_requests_meeting_every_slo() -> None:
    records = [RequestResult(0.0, ttft=0.1, e2e=1.0, output_tokens=10),  # tpot 0.1
               RequestResult(0.0, ttft=0.6, e2e=1.0, output_tokens=10),  # ttft too slow
               RequestResult(0.0, ttft=0.1, e2e=3.0, output_tokens=10),  # tpot ~0.32
               RequestResult(0.0, ttft=0.1, e2e=0.2, output_tokens=1),  # one token: no tpot
               RequestResult(0.0, error="http_500")]
    slos = parse_goodput("ttft:500ms,tpot:0.2s")
    assert slos == {"ttft": 0.5, "tpot": 0.2}
    assert [meets(r, slos) for r in records[:4]] == [True, False, False, True]
    s = summarize_shape(SHAPE, RunResult(records, 0.0, 2.0), slos=slos)
    assert (s["goodput"], s["goodput_ratio"], s["request_throughput"]) == (1.0, 0.5, 2.0)
    assert summarize_shape(SHAPE, RunResult(records, 0.0, 2.0))["goodput"] is None
    assert parse_goodput("e2el:2000,ttft=1s") == {"e2e": 2.0, "ttft": 1.0}  # vLLM's key; bare number is ms
    for bad in ("latency:5ms", "ttft", "ttft:fast", ""):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_saturation_is_where_throughput_stops_growing() -> None:
    def shape(c: int, tput: float) -> dict[str, Any]:
        return {"concurrency": c, "prompt_tokens": 128, "output_tokens": 64, "output_throughput": tput,
                "goodput": None}
    out = series([shape(1, 100.0), shape(8, 700.0), shape(32, 760.0), shape(128, 770.0)])
    assert out == [{"prompt_tokens": 128, "output_tokens": 64, "saturation_concurrency": 8,
                    "peak_output_throughput": 770.0, "peak_at_concurrency": 128, "best_goodput": None,
                    "best_goodput_concurrency": None}]


# --- shapes and prompts -------------------------------------------------------------------------------------------

def test_shape_lists_and_grid() -> None:
    assert parse_int_list("1, 8,32,8") == [1, 8, 32] and parse_int_list("1k,8k") == [1024, 8192]
    for bad in ("", "0", "a", "-1"):
        with pytest.raises(ValueError):
            parse_int_list(bad)
    grid = shape_grid([1, 4], [16, 64], [8])
    assert grid == [Shape(1, 16, 8), Shape(4, 16, 8), Shape(1, 64, 8), Shape(4, 64, 8)]


class TwoTokenWords:
    """A counter whose words cost two tokens each: an even count is out of reach."""

    source, exact = "two", True

    def count(self, text: str) -> int:
        return 3 + 2 * len(text.split())


class FewOneTokenWords:
    """A small vocabulary's tokenizer: only w1 and w2 are one token after another word; the rest cost two."""

    source, exact = "test", True

    def count(self, text: str) -> int:
        return sum(1 if w in ("w0", "w1", "w2") else 2 for w in text.split())


def test_a_tokenizer_with_few_one_token_words_still_gets_a_million_distinct_prompts() -> None:
    """Two usable nonce words made 16 distinct prompts (2^4): vLLM's prefix cache answered most of a run."""
    p = build_prompts(200, FewOneTokenWords(), [f"w{i}" for i in range(30)])
    assert p.nonce[:2] == ("w1", "w2") and p.nonce_words == 20 and p.distinct == NONCE_SPACE
    assert p.measured in (199, 200) and p.stable  # (two-token filler words may step over the target)
    assert len({p.text(i) for i in range(5000)}) == 5000
    assert p.text(NONCE_SPACE + 7) == p.text(7)  # (past the space it wraps)


def test_prompts_fit_the_counter_exactly_or_as_close_as_possible() -> None:
    words = [f"w{i}" for i in range(30)]
    for target in (12, 100, 1000):
        p = build_prompts(target, EstimateCounter(chat=True), words)
        assert p.measured == target and p.stable
        assert len(p.text(0).split()) == target - 8  # the estimate: 8 for the template, one per word
    assert p.distinct == 24 ** 5 >= NONCE_SPACE and len({p.text(i) for i in range(500)}) == 500
    assert build_prompts(9, EstimateCounter(chat=True), words).distinct == 1  # too short for a nonce
    assert build_prompts(100, TwoTokenWords(), words).measured == 99  # closest; under rather than over
    with pytest.raises(ValueError, match="shorter than the smallest prompt"):
        build_prompts(5, EstimateCounter(chat=True), words)


# --- report files -------------------------------------------------------------------------------------------------

def _summary(shapes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"started_at": "2026-01-01T00:00:00", "config": {
        "model": "tiny", "endpoint": "127.0.0.1:1/v1/chat/completions", "mode": "closed loop", "ignore_eos": True,
        "goodput": {"ttft": 500.0}}, "prompts": {"source": "estimate", "exact": False},
        "server": {"max_model_len": 2048}, "shapes": shapes, "series": series(shapes),
        "skipped": [{"concurrency": 1, "prompt_tokens": 4096, "output_tokens": 8, "reason": "too long"}]}


def test_reports_are_written_and_the_html_is_self_contained(tmp_path: Path) -> None:
    with ThreadedFakeWorker(ttft=0.01, token_delay=0.002) as w:
        shapes = [summarize_shape(Shape(c, 64, 10), drive(w.url, concurrency=c, requests=4), slos={"ttft": 0.5})
                  for c in (1, 2)]
        w.options.status = 429
        shapes.append(summarize_shape(Shape(4, 64, 10), drive(w.url, concurrency=4, requests=4)))
    files = write_reports(tmp_path, _summary(shapes), [b'{"x":1}\n'])
    names = {f.name for f in files}
    assert {"results.json", "results.md", "report.html", "requests.jsonl"} <= names
    data = json.loads((tmp_path / "results.json").read_text())
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(data["shapes"][0][key]) == {"mean", "p50", "p90", "p95", "p99"}
    for key in ("request_throughput", "output_throughput", "goodput", "errors", "prompt_tokens_actual"):
        assert key in data["shapes"][0]
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page and page.count("<svg") == 6
    for title in ("Output throughput vs prompt length", "Decode speed per request vs prompt length",
                  "Time to first token (p50) vs prompt length", "Output throughput vs concurrency"):
        assert f'aria-label="{title}"' in page
    assert "http_429" in page and "too long" in page
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0].startswith("| conc |") and "ttft <= 500 ms" in table
    assert "report.png" in names and (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_svg_chart_draws_one_line_per_series() -> None:
    svg = svg_chart(ChartSpec("t", "x", "y", [("a", [(1, 10.0), (8, 20.0)]), ("b", [(1, 5.0)])]))
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 3 and "http" not in svg
    assert "no data" in svg_chart(ChartSpec("t", "x", "y", []))
    assert render_table(_summary([])).startswith("| conc |")
    full, brief = render_table(_summary([])).splitlines()[0], render_table(_summary([]), BRIEF).splitlines()[0]
    assert all(f"{m} p{q}" in full for m in ("TTFT", "TPOT", "ITL", "E2E") for q in (50, 90, 95, 99))
    assert "TTFT p99" in brief and "TTFT p90" not in brief  # the terminal's: p50 and p99


# --- the real engine ----------------------------------------------------------------------------------------------

@pytest.mark.engine
def test_real_engine_prompt_lengths_are_exact_with_the_local_tokenizer(
        engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tokengate")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--url", engine.url, "--model", engine.model, "--api-key", engine.api_key,
                              "--tokenizer", str(engine.model_path), "--concurrency", "1,2", "--prompt-tokens",
                              "16,64", "--output-tokens", "8", "--requests", "4", "--out", str(tmp_path),
                              "--no-progress", "--json"])
    assert args.func(args) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["prompts"]["source"] == "local tokenizer" and summary["prompts"]["exact"]
    assert [(s["concurrency"], s["prompt_tokens"]) for s in summary["shapes"]] == [(1, 16), (2, 16), (1, 64),
                                                                                    (2, 64)]
    for s in summary["shapes"]:
        assert s["completed"] == 4 and s["failed"] == 0, s["errors"]
        p = s["prompt_tokens"]
        assert s["prompt_tokens_actual"] == {"mean": float(p), "min": p, "max": p}  # the server's own count
        assert s["output_tokens_actual"]["min"] == 8  # ignore_eos
        # (TPOT can be 0: on a busy 2-core CPU an answer's chunks may all come in one read, one timestamp)
        assert s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] is not None and s["tpot_ms"]["p50"] >= 0


@pytest.mark.engine
def test_against_the_gateway_prompts_are_exact_through_its_tokenize(
        engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No tokenizer on the bench's side and no model path in the gateway's /v1/models: the gateway's POST /tokenize
    (the worker's own count, passed through) makes the prompt lengths exact."""
    settings = Settings(upstream=[engine.url], upstream_api_key=engine.api_key, discovery_interval=60.0)
    with run_gateway(settings) as gw:
        counted = httpx.post(gw.url + "/tokenize", timeout=30, json={
            "model": engine.model, "messages": [{"role": "user", "content": "Hello there"}],
            "add_generation_prompt": True}).json()
        assert counted["count"] == engine.tokenize({"messages": [{"role": "user", "content": "Hello there"}],
                                                   "add_generation_prompt": True})
        parser = argparse.ArgumentParser(prog="tokengate")
        add_bench_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["bench", "--url", gw.url, "--model", engine.model, "--concurrency", "2",
                                  "--prompt-tokens", "40", "--output-tokens", "4", "--requests", "4", "--out",
                                  str(tmp_path), "--no-progress", "--json"])
        assert args.func(args) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert summary["prompts"]["source"] == "server /tokenize" and summary["prompts"]["exact"]
    (s,) = summary["shapes"]
    assert s["completed"] == 4 and s["prompt_tokens_actual"] == {"mean": 40.0, "min": 40, "max": 40}
