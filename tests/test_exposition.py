"""app/exposition.py: the same bytes as prometheus-client's generate_latest, whatever the registry holds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary, generate_latest
from prometheus_client.metrics_core import GaugeHistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.exposition import STEP, Exposition
from app.metrics import GatewayMetrics, RequestRecord
from app.sse import SSEState

ODD = ['plain', 'quote " inside', 'back\\slash', 'new\nline', 'ünïcödé ✓', '', 'trailing\\']


def _gateway_registry(workers: int) -> tuple[CollectorRegistry, GatewayMetrics]:
    reg = CollectorRegistry()
    m = GatewayMetrics(reg, version="1.2.3")
    for w in range(workers):
        for route in ("chat", "completions"):
            for status in (200, 400, 499, 502):
                m.observe_request(RequestRecord(route, "tiny", "fr", "h100-1x", f"w{w}", status, 0.0, 0.5 + w,
                                                0.02, 0.4, 10, 40, 0.001))
        m.worker_in_flight("tiny", "fr", "h100-1x", f"w{w}").inc(w)
        st = SSEState()
        st.relayed(1.5e-5)
        m.observe_relay(st.relay_buckets, st.relay_seconds)
    return reg, m


class _Custom(Collector):
    """What a collector may hand over that our own metrics don't: timestamps, a gauge histogram, names and label
    names outside the legacy character set, odd floats."""

    def collect(self) -> Iterable[Metric]:
        gh = GaugeHistogramMetricFamily("queue_sizes", "A gauge histogram.\nTwo lines, a \\ too.",
                                        labels=["pool"])
        gh.add_metric(["a"], [("1.0", 3.0), ("+Inf", 5.0)], gsum_value=7.5)
        yield gh
        odd = Metric("weird.name-here", "Odd names.", "gauge")
        odd.add_sample("weird.name-here", {"label.with.dots": "x", "ok": 'v"'}, 1e-12)
        odd.add_sample("weird.name-here", {"label.with.dots": "y", "ok": "w"}, 123456789012.0, timestamp=1700000000.5)
        odd.add_sample("weird.name-here", {"label.with.dots": "z", "ok": "n"}, float("nan"))
        odd.add_sample("weird.name-here", {"label.with.dots": "i", "ok": "n"}, float("-inf"))
        yield odd
        untyped = Metric("legacy_untyped", "Unknown type.", "unknown")
        untyped.add_sample("legacy_untyped", {}, 42)
        yield untyped


def _every_kind_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    c = Counter("things", "Things counted.", ["kind"], registry=reg)
    g = Gauge("level", "A level.", ["name"], registry=reg)
    h = Histogram("latency_seconds", "Latency.", ["route"], buckets=(0.01, 0.1, 1.0, 10.0), registry=reg)
    s = Summary("sizes", "Sizes.", registry=reg)
    Info("build", "Build info.", registry=reg).info({"version": "1", "odd": 'a"b\\c\nd'})
    Enum("state", "A state.", states=["up", "down"], registry=reg).state("down")
    for i, v in enumerate(ODD):
        c.labels(v).inc(i + 0.5)
        g.labels(v).set(-i * 1e21)
        h.labels(v).observe(i * 0.3)
    s.observe(3.25)
    reg.register(_Custom())
    return reg


@pytest.mark.parametrize("build", [lambda: _gateway_registry(1)[0], lambda: _gateway_registry(4)[0],
                                   _every_kind_registry, CollectorRegistry])
def test_render_is_byte_for_byte_generate_latest(build: object) -> None:
    reg = build()  # type: ignore[operator]
    ex = Exposition()
    assert ex.render(reg) == generate_latest(reg)
    assert ex.render(reg) == generate_latest(reg)  # from the cache this time


def test_values_that_change_are_read_again_with_the_labels_kept() -> None:
    reg, m = _gateway_registry(2)
    ex = Exposition()
    before = ex.render(reg)
    m.observe_request(RequestRecord("chat", "tiny", "fr", "h100-1x", "w1", 200, 0.0, 30.0, 2.0, 20.0, 100, 900))
    m.observe_request(RequestRecord("chat", "tiny", "uae", "h100-8x", "w9", 503, 0.0, 0.1))  # a new series
    after = ex.render(reg)
    assert after != before and after == generate_latest(reg)
    assert b'tokengate_requests_total{model="tiny",preset="h100-8x",region="uae",route="chat",status="503",' \
           b'worker="w9"} 1.0' in after


def test_a_full_cache_starts_over_and_still_renders_right() -> None:
    reg = _every_kind_registry()
    ex = Exposition(max_series=5)
    for _ in range(3):
        assert ex.render(reg) == generate_latest(reg)
    assert len(ex._prefixes) <= 5 and len(ex._older) <= 5


def test_a_scrape_of_a_few_more_series_than_the_cache_holds_still_finds_most_of_them() -> None:
    """Past ``max_series`` the cache is not dropped whole: a render of 1.2x as many series as it holds makes only
    a fraction of them again (dropped whole, every render made all but a few again)."""
    reg = CollectorRegistry()
    g = Gauge("g", "A gauge.", ["i"], registry=reg)
    for i in range(1200):
        g.labels(str(i)).set(i)
    ex = Exposition(max_series=1000)
    assert ex.render(reg) == generate_latest(reg) and ex.made == 1200
    for _ in range(3):
        made = ex.made
        assert ex.render(reg) == generate_latest(reg)
        assert ex.made - made <= 400
    assert len(ex._prefixes) + len(ex._older) <= 2 * 1000


def test_stepwise_render_is_the_same_text_and_lets_the_loop_run_between_pieces() -> None:
    reg, _ = _gateway_registry(8)  # ~2 000 lines: several pieces of STEP lines
    expected = generate_latest(reg)
    assert expected.count(b"\n") > 3 * STEP
    ex = Exposition()
    assert all(len(part) <= STEP + 2 for part in ex.parts(reg))  # + the HELP/TYPE of the OpenMetrics samples

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
        text = await ex.render_stepwise(reg)
        ran = ticks - start
        task.cancel()
        return text, ran

    text, ran = asyncio.run(go())
    assert text == expected
    pieces = sum(1 for _ in ex.parts(reg))
    assert ran >= pieces - 1 >= 4  # the other task ran between every two pieces


def test_a_family_that_fails_names_itself_as_generate_latest_does() -> None:
    class Broken(Collector):
        def collect(self) -> Iterable[Metric]:
            m = Metric("broken", "Broken.", "gauge")
            m.add_sample("broken", {"a": "b"}, "not a number")  # type: ignore[arg-type]
            yield m

    reg = CollectorRegistry()
    reg.register(Broken())
    with pytest.raises(ValueError) as ours:
        Exposition().render(reg)
    with pytest.raises(ValueError) as theirs:
        generate_latest(reg)
    assert ours.value.args[-1].name == theirs.value.args[-1].name == "broken"


def test_our_own_metrics_are_read_as_the_text_is_made_not_a_whole_family_at_once() -> None:
    reg = CollectorRegistry()
    g = Gauge("many", "One family of more than three pieces.", ["i"], registry=reg)
    for i in range(3 * STEP):
        g.labels(str(i)).set(1)
    parts = Exposition().parts(reg)
    first = next(parts)
    assert 'many{i="0"} 1.0\n' in first
    g.labels(str(3 * STEP - 1)).set(7)  # after the first piece: read when its own piece is made
    rest = "".join(line for part in parts for line in part)
    assert f'many{{i="{3 * STEP - 1}"}} 7.0\n' in rest


def test_a_metric_class_with_its_own_collect_is_rendered_through_it() -> None:
    class Doubled(Gauge):
        def collect(self) -> Iterable[Metric]:
            (m,) = super().collect()
            m.samples = [s._replace(value=s.value * 2) for s in m.samples]
            return [m]

    reg = CollectorRegistry()
    Doubled("doubled", "Its own collect.", registry=reg).set(21)
    text = Exposition().render(reg)
    assert text == generate_latest(reg) and b"doubled 42.0\n" in text
