"""``GET /metrics/workers``: every registered worker's ``vllm:*`` metrics in one scrape.

Each worker's ``/metrics`` is fetched concurrently (short timeout) through the gateway's ``UpstreamPool``, its
``vllm:`` families are kept, and every sample gets the worker's ``region``, ``preset`` and ``worker`` labels
(ours win over a worker's own). Families are merged across workers, so the answer is valid Prometheus text. One
extra gauge per worker, ``tokengate_worker_metrics_up``, says whether its scrape worked (like Prometheus' ``up``).
Parsing and rendering run on the event loop in steps of ``STEP`` samples (``relabel_stepwise``): a vLLM
exposition is ~50 KB of text, and the loop carries the requests.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import _parse_sample, _split_quoted, _unquote_unescape, text_string_to_metric_families
from prometheus_client.samples import Sample

from .api import State
from .errors import GatewayError
from .exposition import STEP, Exposition, exposed_name
from .upstream import UpstreamPool
from .workers.registry import Worker

log = logging.getLogger("tokengate.worker_metrics")

SCRAPE_TIMEOUT = 3.0
MAX_BYTES = 16 * 1024 * 1024
PREFIX = "vllm:"
PARSE_WEIGHT = 5  # the text parser: ~40 us a sample here, ~5x rendering a line (what STEP is sized by)


async def fetch_metrics(pool: UpstreamPool, worker: Worker, timeout: float = SCRAPE_TIMEOUT) -> str | None:
    """The worker's /metrics text, or None (logged) when it cannot be had within ``timeout``."""
    headers = [("authorization", f"Bearer {worker.api_key}")] if worker.api_key else []
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request(worker.origin, "GET", "/metrics", headers=headers, timeout=timeout)
            try:
                body = await resp.read(timeout, limit=MAX_BYTES)
            finally:
                resp.release()
    except (GatewayError, OSError, TimeoutError) as exc:
        log.debug("no metrics from worker %s: %s", worker.name, exc)
        return None
    if resp.status != 200:
        log.debug("worker %s answered /metrics with HTTP %d", worker.name, resp.status)
        return None
    return body.decode("utf-8", errors="replace")


UP = "tokengate_worker_metrics_up"
UP_HELP = "1 when the gateway could scrape the worker's /metrics."
LINE_WEIGHT = PARSE_WEIGHT + 1  # a line parsed, then its sample relabelled and rendered
CHUNK_LINES = STEP // LINE_WEIGHT  # lines parsed and rendered between two looks at the loop
MAX_LINE = 64 * 1024  # a longer line makes the worker's text unparsable: one line is parsed in one go (~170 ms a MB)
CHUNK_CHARS = CHUNK_LINES * 256  # ... or of this many characters: a long label value weighs as the lines it is long


@dataclass
class _Family:
    """A merged family: its head and its samples' lines, rendered as parsed. Kept as text, not as prometheus-client
    ``Sample`` objects: a scrape's worth of those (a namedtuple and a label dict a sample) made every collection of
    the garbage collector's oldest generation tens of ms longer while it lasted, on the loop."""

    name: str
    type: str
    doc: str
    lines: list[str] = field(default_factory=list)


_ALLOWED = {"counter": ("",), "gauge": ("",), "summary": ("_count", "_sum", ""),
            "histogram": ("_count", "_sum", "_bucket")}  # the sample names of a typed family (the text parser's)
_SPACE = re.compile(r"[ \t\n\r\x0b\x0c]+")  # the parser's separators (string.whitespace)
_PLAIN = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{|[ \t])")  # a sample line's name, where it is plain


# the parser's own helpers (untyped, private): _chunks reads a line exactly as the parser does
_split = cast(Callable[[str, None, int], list[str]], _split_quoted)
_unquote = cast(Callable[[str], tuple[str, bool]], _unquote_unescape)
_sample = cast(Callable[[str], Sample], _parse_sample)


class _Unsplittable(Exception):
    """A family's HELP or TYPE changes after a piece was cut inside it: the parser applies the change to the whole
    family, pieces would only to the samples after it. Such a text is parsed whole."""


def _directive(line: str) -> tuple[str, str, str]:
    """A comment line as the text parser reads it: (``HELP``/``TYPE``/"" for other comments, the family name
    (unquoted), the rest: the doc or the type)."""
    parts = _SPACE.split(line, 3) if '"' not in line else _split(line, None, 3)
    if len(parts) < 2 or parts[1] not in ("HELP", "TYPE"):
        return "", "", ""
    name = _unquote(parts[2])[0] if len(parts) > 2 else ""
    return parts[1], name, parts[3] if len(parts) > 3 else ""


def _sample_name(line: str) -> str:
    """A sample line's metric name as the text parser reads it (its own code where the line is not plain)."""
    plain = _PLAIN.match(line)
    if plain is not None and (plain.group(2) == "{" or "{" not in line):
        return plain.group(1)
    return _sample(line).name  # a quoted name, an exemplar, odd spacing; ValueError if unparsable


def _chunks(text: str, size: int = CHUNK_LINES, max_chars: int = CHUNK_CHARS) -> Iterator[tuple[str, int]]:
    """The text in pieces of about ``size`` lines or ``max_chars`` characters, cut at line ends, each with its weight
    in lines (the lines read for it, or their length over 256 where that is more): one family of 100 000 samples is
    parsed a few dozen lines at a time, not in one go. Each piece parses alone into the samples it holds under the
    families the whole text puts them in (the merge by name joins the pieces again). To that end the lines are read
    as the text parser reads them (its tokens, quoted names, where a family ends), and:
    - a piece that starts inside a family starts with that family's ``# HELP`` and ``# TYPE`` lines again;
    - lines the parser ignores or that change nothing (blank lines, comments, a family's HELP or TYPE again) are left
      out, and a family's HELP replaced before its TYPE or first sample is too;
    - a piece never ends inside a family that has its HELP but not its TYPE, or the other way round, before its first
      sample (the first half would parse as another family) — an empty piece (``""``) then stands for the lines read;
    - a family whose HELP or TYPE changes after a cut inside it raises ``_Unsplittable``."""
    name = ""  # the family the parser is in, at the line being looked at ("": none)
    help_line = type_line = ""  # its last HELP and TYPE lines
    doc = kind = ""  # what they say
    allowed: tuple[str, ...] = ()
    sampled = False  # the current family has had a sample
    cut_inside = False  # a piece was cut inside the current family
    help_kept = 0  # the length of the family's HELP line where it is the last line kept (0: it is not)
    head = ""  # the piece's first lines: its family's HELP and TYPE
    due = False  # the piece is overdue: cut it where that parses the same
    kept: list[str] = []  # the piece's lines before ``run``
    run = 0  # where the piece's current run of kept lines starts
    start = stop = lines = 0  # start: where the lines read since the last yield start
    end = len(text)
    while stop < end:
        nxt = text.find("\n", stop) + 1 or end
        if nxt - stop > MAX_LINE:
            raise ValueError(f"a line of {nxt - stop} characters (the most taken is {MAX_LINE})")
        line = text[stop:nxt].strip()
        directive, new_name, rest = _directive(line) if line.startswith("#") else ("", "", "")
        starts_family = bool(directive) and new_name != name
        full = lines >= size or stop - start >= max_chars
        if full or due:  # time to yield
            weight = max(lines, (stop - start) // 256)
            if starts_family or sampled or bool(help_line) == bool(type_line):  # a cut here parses the same
                yield head + "".join(kept) + text[run:stop], weight
                head = "" if starts_family else help_line + type_line
                cut_inside = bool(name) and not starts_family
                kept, run, help_kept, due = [], stop, 0, False
                start, lines = stop, 0
            elif full:  # not here: the lines read so far, and a cut as soon as one parses the same
                yield "", weight
                start, lines, due = stop, 0, True
        lines += 1
        no_op = (not line or (line.startswith("#") and not directive)
                 or (directive == "HELP" and not starts_family and help_line and rest == doc)
                 or (directive == "TYPE" and not starts_family and type_line and rest == kind))
        replaces = not no_op and directive == "HELP" and not starts_family and help_kept
        if no_op or replaces:  # the run of kept lines ends before this line
            if run < stop:
                kept.append(text[run:stop])
            run = nxt
            if no_op:
                stop = nxt
                continue
            kept[-1] = kept[-1][:-help_kept] + text[stop:nxt]  # a HELP in place of the one kept just before it
        help_kept = 0
        if starts_family:
            name, help_line, type_line, doc, kind, sampled, cut_inside = new_name, "", "", "", "", False, False
            allowed = (name,)
        if directive == "HELP":
            if cut_inside and rest != doc:
                raise _Unsplittable(f"{name}: its HELP changes after its first samples")
            help_line, doc = line + "\n", rest
            help_kept = 0 if sampled or type_line else nxt - stop
        elif directive == "TYPE":
            if cut_inside and rest != kind:
                raise _Unsplittable(f"{name}: its TYPE changes after its first samples")
            type_line, kind = line + "\n", rest
            allowed = tuple(name + s for s in _ALLOWED.get(rest, ("",)))
        elif not line.startswith("#"):
            sampled = True
            if name and _sample_name(line) not in allowed:  # the family ends here (the parser's rule)
                name, help_line, type_line, doc, kind, allowed, cut_inside = "", "", "", "", "", (), False
        stop = nxt
    piece = "".join(kept) + text[run:end]
    if piece or lines:
        yield (head + piece if piece else ""), max(lines, (end - start) // 256)


def _take(families: Iterable[Metric], found: dict[str, _Family], exposition: Exposition,
          ours: dict[str, str]) -> None:
    """Parsed families' ``vllm:`` samples, labelled and rendered, into ``found`` (by the name each shows)."""
    for f in families:
        if f.name.startswith(PREFIX):
            key = exposed_name(f.name, f.type)  # a counter x and a gauge x_total: one name
            family = found.get(key)
            if family is None:
                family = found[key] = _Family(f.name, f.type, f.documentation)
            elif family.type != f.type:
                continue  # a name twice, of two types: the first one's kept (as across workers)
            family.lines.append("".join([exposition.line(s.name, {**s.labels, **ours}, s.value, s.timestamp)
                                         for s in f.samples]))


def _parse_steps(text: str, found: dict[str, _Family], exposition: Exposition, ours: dict[str, str],
                 size: int = CHUNK_LINES) -> Iterator[int]:
    """A worker's text parsed into ``found`` a piece at a time, yielding each piece's weight; a text whose pieces
    would not parse the same (``_Unsplittable``) again whole, a family at a time."""
    try:
        for piece, count in _chunks(text, size):
            _take(text_string_to_metric_families(piece), found, exposition, ours)
            yield LINE_WEIGHT * count
    except _Unsplittable as why:
        log.debug("a worker's metrics parsed whole: %s", why)
        found.clear()
        for f in text_string_to_metric_families(text):
            _take((f,), found, exposition, ours)
            yield LINE_WEIGHT * max(1, len(f.samples))


def _merge_steps(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition,
                 merged: dict[str, _Family], up: list[str], size: int = CHUNK_LINES) -> Iterator[None]:
    """``relabel``'s work, pausing (a bare ``yield``) after about ``STEP`` units: a line parsed, relabelled and
    rendered is ``LINE_WEIGHT`` units. A worker's text is all parsed before any of it is merged: one that turns out
    unparsable counts as down, nothing of it kept. Fills ``merged`` (by the name a family shows in the text, first
    seen first; of two families of one name but not one type, the first one's kept: Prometheus refuses a text
    with two TYPE lines for a name) and ``up`` (the up gauge's lines). A piece's lines of a family are kept
    joined: few objects for the collector to walk."""
    done = 0
    for worker, text in scrapes:
        ours = {"region": worker.region, "preset": worker.preset, "worker": worker.name}
        found: dict[str, _Family] = {}
        if text is not None:
            try:
                for weight in _parse_steps(text, found, exposition, ours, size):
                    done += weight
                    while done >= STEP:
                        done -= STEP
                        yield
            except Exception as exc:  # the parser's, on a worker's text: ValueError, OverflowError (a
                # timestamp of +Inf or 400 digits), IndexError (a line like '{,'): that worker is down, not the scrape
                log.warning("worker %s sent unparsable metrics: %r", worker.name, exc)
                text, found = None, {}
        up.append(exposition.line(UP, ours, 0.0 if text is None else 1.0))
        for key, family in found.items():
            target = merged.setdefault(key, _Family(family.name, family.type, family.doc))
            if target.type == family.type:  # workers of different vLLM versions may disagree: the first one wins
                target.lines += family.lines


TEXT_CHARS = 1 << 20  # characters of the answer joined and encoded between two looks at the loop


def _text(exposition: Exposition, merged: dict[str, _Family], up: list[str],
          size: int = TEXT_CHARS) -> Iterator[bytes]:
    """The answer's text, encoded in parts of about ``size`` characters (a 100 000-sample family is ~10 MB)."""
    part: list[str] = []
    length = 0
    for f in [*merged.values(), _Family(UP, "gauge", UP_HELP, up)]:
        for text in (exposition.head(f.name, f.type, f.doc), *f.lines):
            part.append(text)
            length += len(text)
            if length >= size:
                yield "".join(part).encode("utf-8")
                part, length = [], 0
    yield "".join(part).encode("utf-8")


def relabel(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition | None = None) -> bytes:
    """Prometheus text of every worker's ``vllm:`` families, labelled and merged; ``None`` text: scrape failed."""
    exposition = exposition or Exposition()
    merged: dict[str, _Family] = {}
    up: list[str] = []
    for _ in _merge_steps(scrapes, exposition, merged, up):
        pass
    return b"".join(_text(exposition, merged, up))


async def relabel_stepwise(scrapes: Sequence[tuple[Worker, str | None]], exposition: Exposition) -> bytes:
    """``relabel`` on the event loop, given back every ``STEP`` units (~1-2 ms): eight vLLM expositions are
    ~100 ms of parsing and rendering. Not a thread: uvloop takes the GIL for each callback, so while a thread
    parsed, every callback of the loop waited for the 5 ms switch interval."""
    merged: dict[str, _Family] = {}
    up: list[str] = []
    for _ in _merge_steps(scrapes, exposition, merged, up):
        await asyncio.sleep(0)
    parts = []
    for part in _text(exposition, merged, up):
        parts.append(part)
        await asyncio.sleep(0)
    return b"".join(parts)


async def scrape_workers(pool: UpstreamPool, workers: Sequence[Worker], exposition: Exposition,
                         timeout: float = SCRAPE_TIMEOUT) -> bytes:
    texts = await asyncio.gather(*(fetch_metrics(pool, w, timeout) for w in workers))
    return await relabel_stepwise(list(zip(workers, texts, strict=True)), exposition)


router = APIRouter(tags=["ops"])


@router.get("/metrics/workers")
async def worker_metrics(state: State) -> Response:
    """Every worker's vllm:* metrics with region/preset/worker labels (Prometheus job ``vllm-workers``)."""
    return Response(await scrape_workers(state.pool, state.registry.workers(),
                                          state.worker_exposition),
                    media_type=CONTENT_TYPE_LATEST)
