"""Prometheus text exposition (format 0.0.4): byte for byte what prometheus-client's ``generate_latest`` writes,
at a fraction of its cost.

``generate_latest`` escapes and validates every label name and value of every sample on every scrape: ~24 µs a
line, so a gateway with 4 workers (~1 000 lines: four latency histograms per route and worker) spent ~24 ms per
scrape and 16 workers ~90 ms — on the event loop, every stream stalled that long at each Prometheus scrape. A
series' escaped name and labels never change, so ``Exposition`` makes that part of a line once and keeps it
(bounded: the label sets are bounded by design; past ``max_series`` series the cache starts a new generation and
keeps the last one's series only as they are used again, so a scrape of a few more series than that still finds
most of them); what is left per line is the value. ``tests/test_exposition.py`` compares the bytes with
``generate_latest`` on registries with every metric type, escapes and timestamps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

_ESCAPING = om.UNDERSCORES  # generate_latest's default: what Prometheus asks for with format 0.0.4
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")  # OpenMetrics-only samples, written as gauges after the family
# the Prometheus-format type of each OpenMetrics type (generate_latest's munging) and the suffix of its HELP name
_TYPES = {"counter": ("counter", "_total"), "info": ("gauge", "_info"), "stateset": ("gauge", ""),
          "gaugehistogram": ("histogram", ""), "unknown": ("untyped", "")}

STEP = 150  # lines rendered between two looks at the event loop (~1-2 ms)

_go_float = cast(Callable[[float], str], floatToGoString)  # untyped upstream; the Go-style float of the format

_SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


class Exposition:
    """``render(registry)`` → the text ``generate_latest(registry)`` would return. One per app (it lives in the
    app's state); safe to call from several threads at once (a lost cache entry is only made again)."""

    def __init__(self, max_series: int = 200_000) -> None:
        self.max_series = max_series
        self.made = 0  # series prefixes made (cache misses)
        self._prefixes: dict[_SeriesKey, str] = {}  # series -> 'name{labels} '
        self._older: dict[_SeriesKey, str] = {}  # the generation before: what a render still uses is moved back
        self._heads: dict[tuple[str, str, str], tuple[str, dict[str, str]]] = {}  # family -> HELP/TYPE, om names

    def render(self, registry: Collector) -> bytes:
        return "".join(chunk for part in self.parts(registry) for chunk in part).encode("utf-8")

    async def render_stepwise(self, registry: Collector) -> bytes:
        """``render``, giving the event loop back between families and every ``STEP`` lines: a scrape of a big
        registry is never one long stall of every stream (a thread would not do: with the GIL, each of the loop's
        callbacks would wait for the renderer's switch interval)."""
        done: list[str] = []
        for part in self.parts(registry):
            done += part
            await asyncio.sleep(0)
        return "".join(done).encode("utf-8")

    def parts(self, registry: Collector) -> Iterator[list[str]]:
        """The text in pieces of at most ``STEP`` lines, a family's first piece with its head. Our own metrics'
        samples are read as the lines are made (``families``), so a piece is all a step costs."""
        for family, samples in families(registry):
            head, om_names = self._head(family.name, family.type, family.documentation)
            part = [head]
            om_samples: dict[str, list[str]] = {}
            try:
                for name, labels, value, timestamp in samples:
                    suffix = om_names.get(name)
                    if suffix is None:
                        part.append(self._line(name, labels, value, timestamp))
                        if len(part) >= STEP:
                            yield part
                            part = []
                    else:
                        om_samples.setdefault(suffix, []).append(self._line(name, labels, value, timestamp))
            except Exception as exc:
                exc.args = (exc.args or ("",)) + (family,)  # as generate_latest: say which family failed
                raise
            for suffix, lines in sorted(om_samples.items()):
                name = om.escape_metric_name(family.name + suffix, _ESCAPING)
                part.append(f"# HELP {name} {_doc(family.documentation)}\n# TYPE {name} gauge\n")
                for line in lines:  # (as many as the family's samples: in pieces too)
                    part.append(line)
                    if len(part) >= STEP:
                        yield part
                        part = []
            yield part

    def head(self, name: str, mtype: str, doc: str) -> str:
        """A family's ``# HELP``/``# TYPE`` lines, as ``render`` writes them."""
        return self._head(name, mtype, doc)[0]

    def line(self, name: str, labels: dict[str, str], value: float, timestamp: Any = None) -> str:
        """One sample's line, as ``render`` writes it."""
        return self._line(name, labels, value, timestamp)

    def _line(self, name: str, labels: dict[str, str], value: float, timestamp: Any) -> str:
        key = (name, tuple(labels.items()))
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._older.pop(key, None)
            if prefix is None:
                prefix = _prefix(name, labels)
                self.made += 1
            if len(self._prefixes) >= self.max_series:  # a new generation: what is not used again is dropped
                self._older, self._prefixes = self._prefixes, {}
            self._prefixes[key] = prefix
        if timestamp is None:
            return f"{prefix}{_go_float(value)}\n"
        return f"{prefix}{_go_float(value)} {int(float(timestamp) * 1000):d}\n"

    def _head(self, name: str, mtype: str, doc: str) -> tuple[str, dict[str, str]]:
        key = (name, mtype, doc)
        head = self._heads.get(key)
        if head is None:
            ptype, suffix = _TYPES.get(mtype, (mtype, ""))
            shown = om.escape_metric_name(name + suffix, _ESCAPING)
            head = (f"# HELP {shown} {_doc(doc)}\n# TYPE {shown} {ptype}\n",
                    {name + sfx: sfx for sfx in _OM_SUFFIXES})
            if len(self._heads) >= self.max_series:
                self._heads = {}
            self._heads[key] = head
        return head


def exposed_name(name: str, mtype: str) -> str:
    """The name a family goes by in the text (its HELP and TYPE lines): a counter ``x`` is ``x_total``."""
    return name + _TYPES.get(mtype, ("", ""))[1]


def _doc(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _label_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _prefix(name: str, labels: dict[str, str]) -> str:
    shown = om.escape_metric_name(name, _ESCAPING)
    if not labels:
        return f"{shown} "
    text = ",".join(f'{om.escape_label_name(k, _ESCAPING)}="{_label_value(v)}"' for k, v in sorted(labels.items()))
    return f"{shown}{{{text}}} "


_Samples = Iterable[tuple[str, dict[str, str], float, Any]]  # name, labels, value, timestamp


def families(registry: Collector) -> Iterator[tuple[Metric, _Samples]]:
    """Each family's head (a Metric: name, type, help) and its samples, as ``registry.collect()`` gives them; but
    for a plain ``CollectorRegistry``'s own metrics (prometheus-client's metric classes, whose ``collect`` is
    the base class's) the samples come lazily from the metric — child by child, not a whole family of some
    thousand samples built in one go. Uses prometheus-client internals (``_collector_to_names``, ``_samples``,
    ``_get_metric``), checked by tests/test_exposition.py against generate_latest; anything else (a custom
    collector, the multiprocess collector, a registry with target info) goes through ``collect()``."""
    collectors = _collectors(registry)
    if collectors is None:
        for metric in registry.collect():
            yield metric, ((s.name, s.labels, s.value, s.timestamp) for s in metric.samples)
        return
    for collector in collectors:
        if isinstance(collector, MetricWrapperBase) and type(collector).collect is MetricWrapperBase.collect:
            head: Metric = collector._get_metric()  # type: ignore[no-untyped-call]
            base = collector._name
            yield head, ((base + s[0], s[1], s[2], s[3]) for s in collector._samples())
        else:
            for metric in collector.collect():
                yield metric, ((s.name, s.labels, s.value, s.timestamp) for s in metric.samples)


def _collectors(registry: Collector) -> list[Collector] | None:
    if type(registry) is not CollectorRegistry or registry._target_info:
        return None
    with registry._lock:
        return list(registry._collector_to_names)
