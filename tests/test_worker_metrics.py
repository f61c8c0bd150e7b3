"""app/worker_metrics.py: /metrics/workers merges every worker's vllm:* families, labelled region/preset/worker;
a dead or silent worker costs one short timeout and shows as tokengate_worker_metrics_up 0."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.exposition import STEP, Exposition
from app.main import create_app
from app.settings import Settings
from app.state import WORKER_SERIES
from app.worker_metrics import (
    CHUNK_LINES,
    LINE_WEIGHT,
    MAX_LINE,
    SCRAPE_TIMEOUT,
    _chunks,
    _Family,
    _merge_steps,
    _text,
    _Unsplittable,
    relabel,
    relabel_stepwise,
)
from app.workers.registry import Worker
from bench.fakeworker import ThreadedFakeWorker
from bench.scrapelag import relabel_before

from .conftest import Engine
from .utils import run_gateway, scrape

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def test_relabel_merges_families_and_our_labels_win() -> None:
    text = ("# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m",worker="theirs"} 2.0\n'
            "# HELP process_cpu_seconds_total CPU.\n# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 1.5\n")
    a = Worker(name="fr-0", url="http://127.0.0.1:1", region="fr", preset="h100-1x")
    b = Worker(name="fr-1", url="http://127.0.0.1:2", region="fr", preset="h100-2x")
    dead = Worker(name="uae-0", url="http://127.0.0.1:3", region="uae", preset="h100-1x")
    out = relabel([(a, text), (b, text.replace("2.0", "5.0")), (dead, None)]).decode()
    assert out.count("# TYPE vllm:num_requests_running gauge") == 1
    assert "process_cpu" not in out  # only the vllm: families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}
    running = {(d["worker"], d["preset"]): v for (n, labels), v in samples.items()
               if n == "vllm:num_requests_running" for d in [dict(labels)]}
    assert running == {("fr-0", "h100-1x"): 2.0, ("fr-1", "h100-2x"): 5.0}
    up = {dict(labels)["worker"]: v for (n, labels), v in samples.items() if n == "tokengate_worker_metrics_up"}
    assert up == {"fr-0": 1.0, "fr-1": 1.0, "uae-0": 0.0}


def test_a_counter_and_a_gauge_that_show_under_one_name_are_not_both_written() -> None:
    """A counter ``vllm:a`` shows as ``vllm:a_total``: a worker (another vLLM version) with a gauge of that name
    must not make a second TYPE line for it — Prometheus would refuse the whole scrape."""
    counter = "# HELP vllm:a_total A count.\n# TYPE vllm:a_total counter\nvllm:a_total 3.0\n"
    gauge = "# HELP vllm:a_total A level.\n# TYPE vllm:a_total gauge\nvllm:a_total 7.0\n"
    w1, w2 = Worker(name="w1", url="http://127.0.0.1:1"), Worker(name="w2", url="http://127.0.0.1:2")
    for first, second, kind, value in ((counter, gauge, "counter", 3.0), (gauge, counter, "gauge", 7.0)):
        out = relabel([(w1, first), (w2, second)]).decode()
        assert out.count("# TYPE vllm:a_total ") == 1 and f"# TYPE vllm:a_total {kind}\n" in out
        [family] = [f for f in text_string_to_metric_families(out) if f.name.startswith("vllm:")]
        assert [x.value for x in family.samples] == [value]


def test_unparsable_worker_text_counts_as_down() -> None:
    w = Worker(name="w", url="http://127.0.0.1:1")
    out = relabel([(w, "vllm:x{ 1 2 3\n")]).decode()
    assert 'tokengate_worker_metrics_up{preset="external",region="local",worker="w"} 0.0' in out


def _vllm_text(worker: int) -> str:
    """A vLLM-like exposition: histograms of ~30 buckets, counters and gauges, a few hundred samples."""
    reg = CollectorRegistry()
    for i in range(8):
        h = Histogram(f"vllm:latency_{i}_seconds", "A latency.", ["model_name", "engine"],
                      buckets=[0.001 * 2 ** k for k in range(25)], registry=reg)
        h.labels("m", "0").observe(0.05 * (i + worker))
    Counter("vllm:generation_tokens", "Tokens.", ["model_name"], registry=reg).labels("m").inc(worker + 1)
    Gauge("process_open_fds", "Not vLLM's.", registry=reg).set(3)
    return generate_latest(reg).decode()


def _steps(scrapes: list[tuple[Worker, str | None]]) -> int:
    return sum(1 for _ in _merge_steps(scrapes, Exposition(), {}, []))


def _odd_text() -> str:
    """Families of every kind the text format has, long enough to be cut inside them, with escapes, timestamps,
    comments, blank lines and samples without a TYPE."""
    out = ["# a comment\n", '# HELP vllm:h_seconds A "latency"\\n with \\\\ escapes.\n',
           "# TYPE vllm:h_seconds histogram\n"]
    for le in [*(f"{0.01 * k:.2f}" for k in range(1, 70)), "+Inf"]:
        out.append(f'vllm:h_seconds_bucket{{le="{le}",model_name="a\\"b\\\\c\\nd"}} 3.0\n')
    out += ['vllm:h_seconds_sum{model_name="m"} 1.5\n', 'vllm:h_seconds_count{model_name="m"} 3.0\n',
            "vllm:h_seconds_created 1.7e+09\n", "\n", "# TYPE vllm:tok_total counter\n"]
    out += [f'vllm:tok_total{{adapter="a{i}"}} {i}.0 1700000000000\n' for i in range(40)]
    out += ["# HELP vllm:q Quantiles.\n", "# TYPE vllm:q summary\n"]
    out += [f'vllm:q{{quantile="0.{i}"}} {i}\n' for i in range(1, 10)] + ["vllm:q_sum 4\n", "vllm:q_count 9\n"]
    out += [f'vllm:loose_{i % 3}{{i="{i}"}} {i}\n' for i in range(50)]  # untyped, no HELP or TYPE
    out += ["# TYPE vllm:g gauge\n"] + [f'vllm:g{{i="{i}"}} -{i}e-3\n' for i in range(45)]
    out += ["# HELP vllm:late A HELP, comments, then its TYPE.\n", "# a comment\n", "\n", "# another\n",
            "# TYPE vllm:late counter\n", "vllm:late 1\n"]  # cut between HELP and TYPE: an untyped vllm:late
    out += ["# TYPE vllm:e gauge\n", "vllm:e 1\n", "vllm:e 2\n", "vllm:other 3\n", "vllm:e 4\n", "vllm:e 5\n"]
    out += ["# TYPE process_open_fds gauge\n", "process_open_fds 7\n"]
    return "".join(out)


def test_pieces_parse_into_the_same_samples_under_the_same_families() -> None:
    text = _odd_text()
    def samples(text: str) -> list[tuple[object, ...]]:
        return sorted((f.name, f.type, f.documentation, x.name, sorted(x.labels.items()), x.value, x.timestamp)
                      for f in text_string_to_metric_families(text) for x in f.samples)

    whole = samples(text)
    assert len(whole) == text.count("\n") - 15  # every line but the 13 comments and the 2 blank ones
    assert ("vllm:e", "gauge") in {x[:2] for x in whole} and ("vllm:e", "unknown") in {x[:2] for x in whole}
    for size in (1, 2, 3, 7, CHUNK_LINES, 1000):
        pieces = list(_chunks(text, size))
        assert sum(n for _, n in pieces) == text.count("\n")
        samples_in = [sum(1 for line in piece.split("\n") if line and not line.startswith("#")) for piece, _ in pieces]
        assert max(samples_in) <= size and len(pieces) >= text.count("\n") // (size + 4)
        assert "".join(piece for piece, _ in pieces).count("\n") > text.count("\n") or size >= 1000
        assert sorted(x for piece, _ in pieces for x in samples(piece)) == whole, size
    assert [p for p, _ in _chunks("vllm:a 1\nvllm:b 2", 1)] == ["vllm:a 1\n", "vllm:b 2"]  # no newline at the end


def test_a_piece_repeats_one_help_and_one_type_line_however_often_the_text_has_them() -> None:
    """A text may repeat a family's HELP line (two expositions run together): a piece starts with the last HELP and
    TYPE lines only, so the text is parsed about once, not once for every piece that follows them."""
    text = "# TYPE vllm:r gauge\n" + "".join(f"# HELP vllm:r Doc.\nvllm:r{{i=\"{i}\"}} {i}\n" for i in range(2000))
    pieces = list(_chunks(text, 10))
    assert len(pieces) >= 2000 * 2 // 12
    assert max(piece.count("\n") for piece, _ in pieces) <= 10 + 2
    assert all(piece.startswith("# HELP vllm:r Doc.") or piece.startswith("# TYPE") for piece, _ in pieces)
    got = [(f.name, f.type, f.documentation, s.labels["i"]) for piece, _ in pieces
           for f in text_string_to_metric_families(piece) for s in f.samples]
    assert got == [("vllm:r", "gauge", "Doc.", str(i)) for i in range(2000)]


ODD_TEXTS = {  # texts prometheus-client's parser reads in ways a line-by-line look can miss (from a review)
    "a quoted sample name ends the family": '# TYPE vllm:a gauge\nvllm:a 1\n{"vllm:b"} 2\nvllm:a 3\n',
    "a quoted name in TYPE": '# TYPE "vllm:a" gauge\nvllm:a 1\nvllm:a 2\n',
    "a quoted name in HELP": '# HELP "vllm:a" doc\n# TYPE vllm:a gauge\nvllm:a 1\nvllm:a 2\n',
    "a no-break space: a comment": '# TYPE vllm:a gauge\nvllm:a 1\n# HELP\xa0vllm:b x\nvllm:a 2\n',
    "a space inside a name": '# TYPE vllm:a gauge\nvllm:a 1\nvllm:a b{x="1"} 5\nvllm:a 3\n',
    "HELP changed after samples": '# HELP vllm:a x\n# TYPE vllm:a gauge\nvllm:a 1\nvllm:a 2\n# HELP vllm:a y\n',
    "TYPE after samples": '# HELP vllm:a x\nvllm:a 1\nvllm:a 2\n# TYPE vllm:a counter\nvllm:a 3\n',
    "CRLF line ends, no last newline": '# HELP vllm:a x\r\n# TYPE vllm:a gauge\r\nvllm:a 1\r\nvllm:a 2',
    "an exemplar": '# TYPE vllm:a gauge\nvllm:a 1 # {t="1"} 2\nvllm:a 2\n',
}


@pytest.mark.parametrize("title", ODD_TEXTS)
def test_odd_texts_relabel_as_the_whole_text_parses(title: str) -> None:
    text = ODD_TEXTS[title]
    worker = Worker(name="w", url="http://127.0.0.1:1", region="r", preset="p")
    try:
        expected = relabel_before([(worker, text)])
    except ValueError:
        expected = relabel_before([(worker, None)])  # the old code let it out (a 500); now the worker is down
    assert relabel([(worker, text)]) == expected
    for size in range(1, 6):  # and each cut of it: pieces, or the whole text where pieces would differ
        merged: dict[str, _Family] = {}
        up: list[str] = []
        exposition = Exposition()
        for _ in _merge_steps([(worker, text)], exposition, merged, up, size=size):
            pass
        assert b"".join(_text(exposition, merged, up)) == expected, size


@pytest.mark.parametrize("text", [
    "# HELP vllm:a x\n" + "\n" * 20_000 + "# TYPE vllm:a gauge\nvllm:a 1\n",  # blank lines between HELP and TYPE
    "# HELP vllm:a x\n" + "# a comment\n" * 20_000 + "# TYPE vllm:a gauge\nvllm:a 1\n",
    "# HELP vllm:a x\n" * 20_000 + "# TYPE vllm:a gauge\nvllm:a 1\n",  # the same HELP again and again
    "".join(f"# HELP vllm:a x{i}\n" for i in range(20_000)) + "# TYPE vllm:a gauge\nvllm:a 1\n",  # a new one
    "# TYPE vllm:a gauge\n" + "# HELP vllm:a x\n" * 20_000 + "vllm:a 1\n",
], ids=["blank", "comments", "same-help", "new-help", "type-first"])
def test_no_piece_grows_with_lines_that_cannot_end_one(text: str) -> None:
    """Between a family's HELP and its TYPE a piece may not end; lines that change nothing are left out of it and
    empty pieces stand for them, so the loop is given back all the same (a review measured 0.5-3.7 s in one step)."""
    pieces = list(_chunks(text, 10))
    assert max(len(piece) for piece, _ in pieces) < 200
    assert sum(n for _, n in pieces) == text.count("\n") and len(pieces) >= 20_000 // 10
    worker = Worker(name="w", url="http://127.0.0.1:1")
    doc = text.split("\n# TYPE")[0].rsplit("# HELP vllm:a ", 1)[1].split("\n")[0]
    assert relabel([(worker, text)]).startswith(f"# HELP vllm:a {doc}\n# TYPE vllm:a gauge\nvllm:a{{".encode())


def test_a_family_whose_help_or_type_changes_after_a_cut_is_parsed_whole() -> None:
    text = "# TYPE vllm:d gauge\n" + "".join(f'vllm:d{{i="{i}"}} {i}\n' for i in range(100)) + "# HELP vllm:d Late.\n"
    with pytest.raises(_Unsplittable):
        list(_chunks(text, 10))
    out = relabel([(Worker(name="w", url="http://127.0.0.1:1"), text)]).decode()
    assert "# HELP vllm:d Late.\n" in out and out.count("vllm:d{") == 100


def test_pieces_are_cut_by_length_too_and_long_lines_weigh_as_their_length() -> None:
    long_value = "x" * 60_000
    text = "# TYPE vllm:l gauge\n" + "".join(f'vllm:l{{v="{long_value}{i}"}} {i}\n' for i in range(8))
    pieces = list(_chunks(text))
    assert len(pieces) == 8  # one line a piece: each is past CHUNK_CHARS alone
    assert all(n >= 60_000 // 256 for _, n in pieces)
    worker = Worker(name="w", url="http://127.0.0.1:1")
    assert _steps([(worker, text)]) >= 8 * LINE_WEIGHT * (60_000 // 256) // STEP - 1
    assert relabel([(worker, text)]).count(b"vllm:l{") == 8


def test_a_line_too_long_to_parse_in_one_step_makes_the_worker_down() -> None:
    text = '# TYPE vllm:l gauge\nvllm:l{v="%s"} 1\nvllm:l{v="b"} 2\n' % ("x" * MAX_LINE)
    out = relabel([(Worker(name="w", url="http://127.0.0.1:1"), text)]).decode()
    assert "vllm:l" not in out and 'worker="w"} 0.0' in out


def test_runs_of_empty_families_are_cut_like_any_other_lines() -> None:
    text = "".join(f"# HELP vllm:f{i} Doc.\n# TYPE vllm:f{i} gauge\n" for i in range(5000)) + "vllm:f4999 1\n"
    pieces = list(_chunks(text, 20))
    assert max(piece.count("\n") for piece, _ in pieces) <= 21
    assert list(dict.fromkeys(f.name for piece, _ in pieces for f in text_string_to_metric_families(piece))) == [
        f"vllm:f{i}" for i in range(5000)]


def test_a_timestamp_or_value_past_a_float_makes_the_worker_down_not_the_scrape_fail() -> None:
    good = Worker(name="good", url="http://127.0.0.1:1")
    for bad in ("vllm:x 1 +Inf\n", "vllm:x 1 " + "9" * 400 + "\n", "vllm:x 1 1e400\n", 'vllm:x{a="1"} 1\n{,\xa0=e9\n'):
        out = relabel([(Worker(name="bad", url="http://127.0.0.1:2"), bad), (good, "vllm:y 2\n")]).decode()
        assert 'tokengate_worker_metrics_up{preset="external",region="local",worker="bad"} 0.0' in out
        assert 'vllm:y{preset="external",region="local",worker="good"} 2.0' in out and "vllm:x" not in out


def test_relabel_writes_what_merging_metric_objects_and_generate_latest_wrote() -> None:
    workers = [Worker(name=f"fr-{i}", url=f"http://127.0.0.1:{i + 1}", region="fr", preset="h100-1x")
               for i in range(3)]
    scrapes: list[tuple[Worker, str | None]] = [(workers[0], _odd_text()), (workers[1], _vllm_text(1)),
                                                (workers[2], None),
                                                (Worker(name="bad", url="http://127.0.0.1:9"), _odd_text() + "x{\n")]
    assert relabel(scrapes) == relabel_before(scrapes)
    assert relabel(scrapes[:2]) == relabel_before(scrapes[:2])


def test_one_huge_family_is_parsed_a_piece_at_a_time() -> None:
    """A worker can send one family of many thousand samples (a label with many values): the loop is given back
    while it is parsed, not only after it. Here the text breaks at its very end, so every pause seen came from the
    inside of its one family."""
    lines = 3000
    text = "# TYPE vllm:big gauge\n" + "".join(f'vllm:big{{adapter="a{i}"}} {i}\n' for i in range(lines - 1))
    worker = Worker(name="w", url="http://127.0.0.1:1")
    assert _steps([(worker, text + "vllm:big{ 1 2 3\n")]) >= LINE_WEIGHT * lines // STEP - 1
    assert b"tokengate_worker_metrics_up" in relabel([(worker, text + "vllm:big{ 1 2 3\n")])
    assert relabel([(worker, text)]).count(b"vllm:big{") == lines - 1
    merged: dict[str, _Family] = {}
    up: list[str] = []
    exposition = Exposition()
    for _ in _merge_steps([(worker, text)], exposition, merged, up):
        pass
    parts = list(_text(exposition, merged, up, size=10_000))
    assert len(parts) >= len(text) // 10_000 and b"".join(parts) == relabel([(worker, text)])


def test_worker_metrics_have_a_label_cache_of_their_own_and_a_smaller_one() -> None:
    """Worker label values are the workers' to choose: their series must not fill /metrics' cache."""
    state = create_app(Settings(upstream=["http://127.0.0.1:9"])).state.tokengate
    assert state.worker_exposition is not state.exposition
    assert state.worker_exposition.max_series == WORKER_SERIES < state.exposition.max_series


def test_stepwise_relabel_is_the_same_text_and_lets_the_loop_run_between_steps() -> None:
    workers = [Worker(name=f"fr-{i}", url=f"http://127.0.0.1:{i + 1}", region="fr", preset="h100-1x")
               for i in range(4)]
    scrapes: list[tuple[Worker, str | None]] = [(w, _vllm_text(i)) for i, w in enumerate(workers)]
    scrapes.append((Worker(name="bad", url="http://127.0.0.1:9"), _vllm_text(9) + "vllm:broken{ 1 2 3\n"))
    expected = relabel(scrapes)
    assert expected.count(b"\n") > 4 * STEP

    async def go() -> tuple[bytes, int]:
        ticks = 0

        async def other_work() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        start = ticks
        text = await relabel_stepwise(scrapes, Exposition())
        task.cancel()
        return text, ticks - start

    text, ran = asyncio.run(go())
    assert text == expected and ran >= _steps(scrapes) > 0  # the loop ran at each step
    # a pause every STEP units of work: a line parsed (and its sample relabelled and rendered) counts LINE_WEIGHT
    good = scrapes[:4]
    lines = sum((t or "").count("\n") for _, t in good)
    assert _steps(good) == LINE_WEIGHT * lines // STEP
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    assert {d["worker"] for d in _labelled(samples, "vllm:generation_tokens_total")} == {f"fr-{i}" for i in range(4)}
    # the worker whose text broke after hundreds of good samples: down, and none of its samples kept
    assert not [d for (n, labels) in samples for d in [dict(labels)] if d.get("worker") == "bad"
                and n != "tokengate_worker_metrics_up"]
    assert samples[("tokengate_worker_metrics_up", (("preset", "external"), ("region", "local"),
                                                    ("worker", "bad")))] == 0.0


def test_fake_workers_dead_and_silent_ones_in_one_bounded_scrape(silent_port: int) -> None:
    with ThreadedFakeWorker(model="tiny") as w1, ThreadedFakeWorker(model="tiny") as w2:
        dead = "http://127.0.0.1:9"  # discard port: nothing listens
        silent = f"http://127.0.0.1:{silent_port}"
        settings = Settings(upstream=[w1.url, w2.url, dead, silent], connect_timeout=1, discovery_interval=60)
        with run_gateway(settings) as gw:
            httpx.post(gw.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": False})
            started = time.monotonic()
            samples = scrape(gw.url + "/metrics/workers")
            took = time.monotonic() - started
    assert took < SCRAPE_TIMEOUT + 2, "workers must be scraped concurrently, with a short timeout"
    up = {d["worker"]: samples[("tokengate_worker_metrics_up", tuple(sorted(d.items())))]
          for d in _labelled(samples, "tokengate_worker_metrics_up")}
    names = {u.split("://")[1]: u for u in (w1.url, w2.url, dead, silent)}
    assert up == {names_key: (1.0 if url in (w1.url, w2.url) else 0.0) for names_key, url in names.items()}
    running = _labelled(samples, "vllm:num_requests_running")
    assert sorted(d["worker"] for d in running) == sorted(u.split("://")[1] for u in (w1.url, w2.url))
    assert all(d["region"] == "local" and d["preset"] == "external" and d["model_name"] == "tiny" for d in running)


@pytest.mark.engine
def test_real_engine_metrics_are_reexported_with_worker_labels(engine: Engine) -> None:
    settings = Settings(upstream=[engine.url], upstream_api_key=engine.api_key)
    with run_gateway(settings) as gw:
        name = gw.state.registry.workers()[0].name
        before = scrape(gw.url + "/metrics/workers")
        r = httpx.post(gw.url + "/v1/completions", timeout=60,
                       json={"model": engine.model, "prompt": "hello", "max_tokens": 4, "stream": False})
        assert r.status_code == 200
        after = scrape(gw.url + "/metrics/workers")
        direct = scrape(engine.url + "/metrics", headers=engine.headers)
    ours = {"region": "local", "preset": "external", "worker": name}

    def value(samples: Samples, metric: str) -> float:
        found = [v for (n, labels), v in samples.items() if n == metric and ours.items() <= dict(labels).items()]
        assert found, f"no {metric} with {ours}"
        return sum(found)

    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") == 4
    assert value(after, "vllm:request_success_total") >= 1
    for metric in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        value(after, metric)
    assert any(n == "vllm:time_to_first_token_seconds_bucket" for n, _ in after)
    # every vllm: sample of the worker is there, with the same labels plus ours
    expected = {(n, tuple(sorted({**dict(labels), **ours}.items()))) for n, labels in direct if n.startswith("vllm:")}
    assert expected <= set(after)
    assert value(after, "tokengate_worker_metrics_up") == 1
