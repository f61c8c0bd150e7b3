"""``--workers N``'s ``/metrics``: every gateway process's values, read from prometheus-client's multiprocess files and
merged, in steps on the event loop.

``MultiProcessCollector.collect()`` reads and merges every process's files in one call: with 8 processes in front
of 8 vLLM workers that is ~13 000 entries, ~100 ms here, one stall of every stream of the process that answers
the scrape. ``collect_stepwise`` does the same work — prometheus-client's own algorithm (``_read_metrics`` and
``_accumulate_metrics`` of ``prometheus_client.multiprocess``, 0.26), written as a generator that pauses every
``STEP`` entries — and gives back the same families in the same order; ``tests/test_multiproc.py`` holds it to
``generate_latest`` over a ``MultiProcessCollector`` on files written by real processes, byte for byte.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .exposition import STEP

_AGGREGATED = ("min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")

_Labels = tuple[tuple[str, str], ...]


class Families(Collector):
    """Families already collected, as a collector (what ``Exposition.render_stepwise`` takes)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def shared_dir(workers: int) -> str | None:
    """The multiprocess files' directory when this process is one of ``--workers N`` (N > 1), else None."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return path if workers > 1 and path else None


async def view(own: Collector, directory: str | None) -> Collector:
    """What ``/metrics`` and ``/status`` read: every process's values summed (``directory``), else ``own``."""
    return own if directory is None else Families(await collect_stepwise(directory))


def files_in(path: str) -> list[str]:
    return glob.glob(os.path.join(path, "*.db"))


def merge_steps(files: list[str], out: list[Metric]) -> Iterator[None]:
    """``MultiProcessCollector.merge(files, accumulate=True)`` into ``out``, pausing (a bare ``yield``) every
    ``STEP`` file entries read and every ``STEP`` samples merged."""
    metrics: dict[str, Metric] = {}
    yield from _read(files, metrics)
    for metric in metrics.values():
        yield from _accumulate(metric)
        out.append(metric)


def collect(path: str) -> list[Metric]:
    out: list[Metric] = []
    for _ in merge_steps(files_in(path), out):
        pass
    return out


async def collect_stepwise(path: str) -> list[Metric]:
    out: list[Metric] = []
    for _ in merge_steps(files_in(path), out):
        await asyncio.sleep(0)
    return out


def _read(files: list[str], metrics: dict[str, Metric]) -> Iterator[None]:
    keys: dict[str, tuple[str, str, dict[str, str], _Labels, str]] = {}
    done = 0
    for f in files:
        parts = os.path.basename(f).split("_")
        typ = parts[0]
        try:
            values = MmapedDict.read_all_values_from_file(f)  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            if typ == "gauge" and parts[1].startswith("live"):
                continue  # a live gauge's file, removed by mark_process_dead since the glob
            raise
        for key, value, timestamp, _ in values:
            parsed = keys.get(key)
            if parsed is None:
                metric_name, name, labels, help_text = json.loads(key)
                parsed = keys[key] = (metric_name, name, labels, tuple(sorted(labels.items())), help_text)
            metric_name, name, _labels, labels_key, help_text = parsed
            metric = metrics.get(metric_name)
            if metric is None:
                metric = metrics[metric_name] = Metric(metric_name, help_text, typ)
            if typ == "gauge":
                metric._multiprocess_mode = parts[1]  # type: ignore[attr-defined]
                metric.add_sample(name, labels_key + (("pid", parts[2][:-3]),), value, timestamp)  # type: ignore[arg-type]
            else:
                metric.add_sample(name, labels_key, value)  # type: ignore[arg-type]
            done += 1
            if done >= STEP:
                done = 0
                yield


def _accumulate(metric: Metric) -> Iterator[None]:
    """One family's samples merged across processes (histogram buckets made cumulative again)."""
    samples: defaultdict[_Labels, defaultdict[tuple[str, _Labels], float]] = defaultdict(lambda: defaultdict(float))
    stamps: defaultdict[_Labels, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))
    buckets: defaultdict[_Labels, defaultdict[float, float]] = defaultdict(lambda: defaultdict(float))
    mode: str = getattr(metric, "_multiprocess_mode", "")
    done = 0
    for s in metric.samples:
        name, value, timestamp = s.name, s.value, s.timestamp
        labels: _Labels = s.labels  # type: ignore[assignment]  # a tuple while being merged (as upstream)
        if metric.type == "gauge" and mode in _AGGREGATED:
            labels = tuple(lv for lv in labels if lv[0] != "pid")
        if metric.type == "gauge":
            if mode in ("mostrecent", "livemostrecent"):
                stamp = float(timestamp or 0)
                if stamps[labels][name] < stamp:  # a child never set (stamp 0) is not in the merge's order yet
                    samples[labels][(name, labels)] = value
                    stamps[labels][name] = stamp
            else:
                by = samples[labels]
                if mode in ("min", "livemin"):
                    if value < by.setdefault((name, labels), value):
                        by[(name, labels)] = value
                elif mode in ("max", "livemax"):
                    if value > by.setdefault((name, labels), value):
                        by[(name, labels)] = value
                elif mode in ("sum", "livesum"):
                    by[(name, labels)] += value
                else:  # all / liveall
                    by[(name, labels)] = value
        elif metric.type == "histogram":
            for lv in labels:
                if lv[0] == "le":
                    buckets[tuple(x for x in labels if x[0] != "le")][float(lv[1])] += value
                    break
            else:  # _sum / _count
                samples[labels][(name, labels)] += value
        else:  # counter, summary
            samples[labels][(name, labels)] += value
        done += 1
        if done >= STEP:
            done = 0
            yield
    if metric.type == "histogram":
        for labels, values in buckets.items():
            acc = 0.0
            for bucket, value in sorted(values.items()):
                acc += value
                samples[labels][(metric.name + "_bucket", labels + (("le", _go(bucket)),))] = acc
                done += 1
                if done >= STEP:
                    done = 0
                    yield
            samples[labels][(metric.name + "_count", labels)] = acc
    merged: list[Sample] = []
    for by_labels in samples.values():
        for (name, labels), value in by_labels.items():
            merged.append(Sample(name, dict(labels), value))
            done += 1
            if done >= STEP:
                done = 0
                yield
    metric.samples = merged


def _go(value: float) -> str:
    text: Any = floatToGoString(value)  # type: ignore[no-untyped-call]
    return str(text)
