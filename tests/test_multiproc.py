"""app/multiproc.py: the multiprocess files of real processes, merged in steps into exactly what
prometheus-client's MultiProcessCollector gives."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from app.exposition import STEP, Exposition
from app.multiproc import Families, collect, collect_stepwise, files_in, merge_steps

MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")

WRITER = f"""
import sys, time
from prometheus_client import Counter, Gauge, Histogram, Summary
i = int(sys.argv[1])
c = Counter("reqs", "Requests.", ["route", "status"])
for n in range(20):
    c.labels(f"r{{n % 4}}", str(200 + n % 3)).inc(i + n)
for mode in {MODES!r}:
    g = Gauge(f"g_{{mode}}", f"Gauge, {{mode}}.", ["w"], multiprocess_mode=mode)
    for w in range(3):
        g.labels(f"w{{w}}").set(i * 10 + w - 5)
        time.sleep(0.001)  # mostrecent: the last process to set it wins
h = Histogram("lat_seconds", "Latency.", ["model"], buckets=[0.01 * 2 ** k for k in range(10)])
for n in range(60):
    h.labels(f"m{{n % 12}}").observe(0.003 * (n + i))
Summary("sizes", "Sizes.", ["k"]).labels("a").observe(i + 0.5)
Histogram("empty_seconds", "Never observed.")
print("ok")
"""


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three processes' files; the third one dead (its live gauges removed, as a gateway process that exits)."""
    path = tmp_path_factory.mktemp("prom-multiproc")
    pids = []
    for i in range(3):
        out = subprocess.run([sys.executable, "-c", WRITER, str(i)], env={"PROMETHEUS_MULTIPROC_DIR": str(path)},
                             capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "ok", out.stderr
        pids.append(max(int(f.stem.rsplit("_", 1)[1]) for f in path.glob("counter_*.db")))
    mark_process_dead(pids[-1], str(path))
    return path


def _upstream(path: Path) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry)


def test_merged_families_are_what_multiprocess_collector_gives(files_dir: Path) -> None:
    expected = _upstream(files_dir)
    assert expected.count(b"# TYPE ") == 4 + len(MODES)  # reqs, lat_seconds, sizes, empty_seconds and the gauges
    assert b'reqs_total{route="r0",status="200"}' in expected and b"g_livesum" in expected
    assert generate_latest(Families(collect(str(files_dir)))) == expected
    assert Exposition().render(Families(collect(str(files_dir)))) == expected


def test_merged_in_steps_on_the_loop(files_dir: Path) -> None:
    entries = sum(1 for f in files_in(str(files_dir)) for _ in MmapedDict.read_all_values_from_file(f))
    assert entries > 3 * STEP
    out: list[Metric] = []
    steps = sum(1 for _ in merge_steps(files_in(str(files_dir)), out))
    assert steps >= entries // STEP  # a pause every STEP entries read (and samples merged), at least
    assert generate_latest(Families(out)) == _upstream(files_dir)

    async def go() -> tuple[list[Metric], int]:
        ticks = 0

        async def other_work() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_work())
        await asyncio.sleep(0)
        start = ticks
        families = await collect_stepwise(str(files_dir))
        task.cancel()
        return families, ticks - start

    families, ran = asyncio.run(go())
    assert ran >= steps and generate_latest(Families(families)) == _upstream(files_dir)


def test_a_live_gauge_file_gone_since_the_listing_is_skipped_any_other_is_an_error(files_dir: Path) -> None:
    files = files_in(str(files_dir))
    out: list[Metric] = []
    for _ in merge_steps([*files, str(files_dir / "gauge_livesum_999999.db")], out):
        pass
    assert generate_latest(Families(out)) == _upstream(files_dir)
    with pytest.raises(FileNotFoundError):
        for _ in merge_steps([*files, str(files_dir / "counter_999999.db")], []):
            pass


UNSET_WRITER = """
import sys
from prometheus_client import Gauge
for mode in ("mostrecent", "livemostrecent"):
    g = Gauge(f"g_{mode}", "Gauge.", ["w"], multiprocess_mode=mode)
    if sys.argv[1] == "first":
        g.labels("b")  # made, never set: its timestamp is 0
        g.labels("a").set(1)
    else:
        g.labels("b").set(2)
"""


def test_a_child_never_set_takes_its_place_where_a_process_set_it(tmp_path: Path) -> None:
    """mostrecent: a child one process made but never set is merged where another process set it, as upstream."""
    for which in ("first", "second"):
        subprocess.run([sys.executable, "-c", UNSET_WRITER, which], env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                       check=True, timeout=60)
    for mode in ("mostrecent", "livemostrecent"):
        files = sorted(tmp_path.glob(f"gauge_{mode}_*.db"), key=lambda f: f.stat().st_mtime_ns)
        assert len(files) == 2
        out: list[Metric] = []
        for _ in merge_steps([str(f) for f in files], out):
            pass
        expected = list(MultiProcessCollector.merge([str(f) for f in files], accumulate=True))  # type: ignore[no-untyped-call]
        assert [s.labels["w"] for s in out[0].samples] == [s.labels["w"] for s in expected[0].samples] == ["a", "b"]
        assert generate_latest(Families(out)) == generate_latest(Families(expected))


def test_histogram_buckets_are_made_cumulative_in_steps_too(tmp_path: Path) -> None:
    writer = ("from prometheus_client import Histogram\n"
              "h = Histogram('lat_seconds', 'Latency.', ['k'], buckets=[0.001 * 2 ** b for b in range(30)])\n"
              "for k in range(40):\n    h.labels(str(k)).observe(0.01)\n")
    subprocess.run([sys.executable, "-c", writer], env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                   check=True, timeout=60)
    files = files_in(str(tmp_path))
    out: list[Metric] = []
    steps = sum(1 for _ in merge_steps(files, out))
    # 40 label sets: 33 entries each read and merged, 31 buckets each made cumulative, 33 samples each written
    assert steps >= (40 * 33 * 3 + 40 * 31) // STEP - 2
    assert generate_latest(Families(out)) == _upstream(tmp_path)
