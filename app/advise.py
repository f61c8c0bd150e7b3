"""When to move to a bigger preset: the capacity alerts' logic as pure functions over metric series.

The decision mirrors deploy/prometheus/rules/alerts.yml. Both capacity signals start from TTFT p95 up more than
1.3x against ``offset`` ago (30 minutes in the alerts); they differ in why:

- queue/cap-bound (``TokengateSchedulerBound``): vLLM queues with a (nearly) full KV cache, preempts, or most
  requests hit the max_tokens cap. A bigger preset is not the fix: fix caps or queueing first.
- compute-bound (``TokengateMoveToNextPreset``): steady traffic (0.8-1.25x), per-request decode speed not
  improving (TPS p50 < 1.1x), KV cache with headroom (< 80%), no preemptions, few clamps: move to the next preset.
  Without worker metrics there is no headroom evidence, so no move advice.
- traffic grew (request rate >= 1.25x) with neither of the above: add replicas (the runbooks' advice).

A verdict must hold for ``for_s`` seconds (the alerts' ``for: 15m``) before it is more than "watch". Input comes
from ``tokengate advise`` (app/cli_advise.py), which does all the I/O: Prometheus range queries, or two scrapes of
a /metrics endpoint reduced here by ``signals_from_scrapes``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum

from .presets import Catalog, UnknownPreset

TTFT_RISE = 1.3
TPS_FLAT = 1.1
RATE_STEADY = (0.8, 1.25)
KV_HEADROOM = 0.8
CLAMP_STORM = 0.5

Key = tuple[str, str, str]  # region, preset, model
Labels = tuple[tuple[str, str], ...]
Scrape = Mapping[tuple[str, Labels], float]  # (sample name, sorted labels) -> value, as tests/utils.scrape reads it


class Verdict(StrEnum):
    STAY = "stay"
    FIX_QUEUEING = "fix caps or queueing first"
    MOVE = "move to the next preset"
    ADD_REPLICAS = "add replicas"
    NO_DATA = "not enough data"


@dataclass(frozen=True, slots=True)
class Signals:
    """One region/preset/model at one moment, as the capacity alerts see it. None: no data."""

    ttft_p95: float | None = None
    ttft_p95_ratio: float | None = None  # now / ``offset`` ago
    tps_p50: float | None = None
    tps_p50_ratio: float | None = None
    request_rate: float | None = None  # requests/s
    request_rate_ratio: float | None = None
    kv_cache_usage: float | None = None  # max over the workers, 0..1
    waiting: float | None = None  # requests queued inside vLLM
    preemption_rate: float | None = None  # /s
    clamp_ratio: float | None = None  # requests whose max_tokens was lowered / requests (per model)
    rejection_rate: float | None = None  # cap rejections/s (per model)
    in_flight: float | None = None


SIGNAL_NAMES = tuple(f.name for f in fields(Signals))


@dataclass(frozen=True, slots=True)
class Advice:
    region: str
    preset: str
    model: str
    verdict: Verdict
    reasons: tuple[str, ...]
    next_preset: str | None = None
    held_for: float = 0.0  # seconds the verdict's condition has held up to the latest point
    sustained: bool = False  # held for at least ``for_s`` (an alert would fire)
    latest: Signals = Signals()
    earliest: Signals = Signals()  # the first point of the window, for the trend


def histogram_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float | None:
    """Prometheus' histogram_quantile over one histogram: ``bounds`` are the ``le`` values (ending with +Inf),
    ``cumulative`` the bucket counts. None when the histogram is empty."""
    if not cumulative or cumulative[-1] <= 0 or len(bounds) != len(cumulative):
        return None
    rank = q * cumulative[-1]
    i = next(i for i, c in enumerate(cumulative) if c >= rank)
    if math.isinf(bounds[i]):
        return bounds[i - 1] if i > 0 else None
    lower, below = (bounds[i - 1], cumulative[i - 1]) if i > 0 else (0.0, 0.0)
    count = cumulative[i] - below
    if count <= 0:
        return bounds[i]
    return lower + (bounds[i] - lower) * (rank - below) / count


def _gt(v: float | None, limit: float) -> bool:
    return v is not None and v > limit


def _state(s: Signals) -> tuple[Verdict, list[str]]:
    """The verdict at one point in time, with the reasons; the alerts' expressions, in Python."""
    if s.ttft_p95_ratio is None:
        if s.request_rate is None or s.request_rate <= 0:
            return Verdict.NO_DATA, ["no traffic to judge by (no TTFT samples)"]
        return Verdict.STAY, ["no TTFT trend yet (nothing to compare with)"]
    if not s.ttft_p95_ratio > TTFT_RISE:
        return Verdict.STAY, [f"TTFT p95 {s.ttft_p95_ratio:.2f}x (at most {TTFT_RISE}x is fine)"]
    rise = f"TTFT p95 up {s.ttft_p95_ratio:.2f}x"
    queued = _gt(s.waiting, 0) and s.kv_cache_usage is not None and s.kv_cache_usage >= KV_HEADROOM
    preempting = _gt(s.preemption_rate, 0)
    clamping = _gt(s.clamp_ratio, CLAMP_STORM)
    if queued or preempting or clamping:
        why = [rise]
        if queued:
            why.append(f"{s.waiting:g} requests waiting in vLLM with the KV cache at {s.kv_cache_usage:.0%}")
        if preempting:
            why.append(f"vLLM preempting {s.preemption_rate:.2g}/s")
        if clamping:
            why.append(f"{s.clamp_ratio:.0%} of requests hit the max_tokens cap")
        why.append("a bigger preset won't fix a bad scheduler: lower max_tokens_cap/default_max_tokens or "
                   "max_model_len, tune max_num_seqs")
        return Verdict.FIX_QUEUEING, why
    rate = s.request_rate_ratio
    if rate is not None and rate >= RATE_STEADY[1]:
        return Verdict.ADD_REPLICAS, [rise, f"traffic grew {rate:.2f}x: scale out (more replicas), not up"]
    if s.kv_cache_usage is None:
        return Verdict.STAY, [rise, "no worker metrics (KV cache usage): no headroom evidence, no move advice"]
    steady = rate is not None and RATE_STEADY[0] < rate < RATE_STEADY[1]
    flat = s.tps_p50_ratio is not None and s.tps_p50_ratio < TPS_FLAT
    if steady and flat and s.kv_cache_usage < KV_HEADROOM:
        return Verdict.MOVE, [rise, f"at steady traffic ({rate:.2f}x)",
                              f"per-request tokens/s not improving ({s.tps_p50_ratio:.2f}x)",
                              f"KV cache has headroom ({s.kv_cache_usage:.0%}): the GPUs are compute-bound"]
    why = [rise]
    if not steady:
        why.append("traffic " + (f"changed {rate:.2f}x" if rate is not None else "trend unknown"))
    if not flat:
        why.append("tokens/s trend " + (f"{s.tps_p50_ratio:.2f}x" if s.tps_p50_ratio is not None else "unknown"))
    return Verdict.STAY, [*why, "watch: not a clear compute-bound pattern"]


def next_preset(catalog: Catalog, region: str, preset: str) -> str | None:
    """The next preset up of the same GPU type in the region (the ladder of preset:tokengate_next_preset:info)."""
    try:
        current = catalog.get(region, preset)
    except UnknownPreset:
        return None
    ladder = [p for p in catalog.presets(region) if p.gpu_type == current.gpu_type]
    i = ladder.index(current)
    return ladder[i + 1].name if i + 1 < len(ladder) else None


def advise(key: Key, points: Sequence[tuple[float, Signals]], *, catalog: Catalog | None, for_s: float
           ) -> Advice:
    """The verdict for one region/preset/model from its signals over time (oldest first)."""
    region, preset, model = key
    if not points:
        return Advice(region, preset, model, Verdict.NO_DATA, ("no samples",))
    t_last, latest = points[-1]
    verdict, reasons = _state(latest)
    held_since = t_last
    for t, s in reversed(points[:-1]):
        if _state(s)[0] is not verdict:
            break
        held_since = t
    held = t_last - held_since
    sustained = held >= for_s
    nxt = None
    if verdict is Verdict.MOVE:
        nxt = next_preset(catalog, region, preset) if catalog is not None else None
        if nxt is None:
            reasons.append(f"preset {preset!r} has no larger preset in the catalog of {region!r}: add replicas, or "
                           "name the current preset with --preset")
    if verdict in (Verdict.MOVE, Verdict.FIX_QUEUEING, Verdict.ADD_REPLICAS) and not sustained:
        reasons.append(f"held {held / 60:.0f} of the {for_s / 60:.0f} min the alerts wait for: watch, not yet act")
    if _gt(latest.rejection_rate, 0):
        reasons.append(f"cap rejections at {latest.rejection_rate:.2g}/s: clients asking beyond the caps")
    return Advice(region, preset, model, verdict, tuple(reasons), nxt, held, sustained, latest, points[0][1])


def advise_all(series: Mapping[Key, Sequence[tuple[float, Signals]]], *, catalog: Catalog | None,
               for_s: float, preset_override: str | None = None) -> list[Advice]:
    """``preset_override`` names the preset of the workers labelled "external" (the gateway only proxies to them)."""
    out = []
    for key in sorted(series):
        region, preset, model = key
        named = (region, preset_override, model) if preset_override is not None and preset == "external" else key
        out.append(advise(named, series[key], catalog=catalog, for_s=for_s))
    return out


# --- reducing raw metrics to signals ------------------------------------------------------------------------------

def signals_from_series(series: Mapping[str, Mapping[tuple[str, ...], Sequence[tuple[float, float]]]]
                        ) -> dict[Key, list[tuple[float, Signals]]]:
    """Prometheus range-query results, one per signal name: {signal: {labels key: [(t, v)]}}. Keys are
    (region, preset, model), or (region, model) for the cap signals (caps are decided per model x region pool),
    joined on those two."""
    per_key: dict[Key, dict[float, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    per_pool: dict[tuple[str, str], dict[float, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for name, by_key in series.items():
        for labels, values in by_key.items():
            for t, v in values:
                if math.isnan(v) or math.isinf(v):
                    continue
                if len(labels) == 2:
                    per_pool[(labels[0], labels[1])][t][name] = v
                elif len(labels) == 3 and labels[1]:
                    per_key[(labels[0], labels[1], labels[2])][t][name] = v
    out: dict[Key, list[tuple[float, Signals]]] = {}
    for key, by_t in per_key.items():
        pool_values = per_pool.get((key[0], key[2]), {})
        out[key] = [(t, Signals(**{**pool_values.get(t, {}), **by_t[t]})) for t in sorted(by_t)]
    return out


def _group(scrape: Scrape, name: str, by: Sequence[str], *, rename: Mapping[str, str] | None = None
           ) -> dict[tuple[str, ...], list[tuple[dict[str, str], float]]]:
    out: dict[tuple[str, ...], list[tuple[dict[str, str], float]]] = defaultdict(list)
    for (sname, labels), value in scrape.items():
        if sname != name:
            continue
        d = dict(labels)
        for src, dst in (rename or {}).items():
            if src in d:
                d[dst] = d[src]
        out[tuple(d.get(k, "") for k in by)].append((d, value))
    return out


def _sum(scrape: Scrape, name: str, by: Sequence[str], **kw: Mapping[str, str]) -> dict[tuple[str, ...], float]:
    return {k: sum(v for _, v in vs) for k, vs in _group(scrape, name, by, **kw).items()}


def _buckets(scrape: Scrape, name: str) -> dict[Key, dict[float, float]]:
    out: dict[Key, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for k, items in _group(scrape, name + "_bucket", ("region", "preset", "model")).items():
        for labels, v in items:
            out[(k[0], k[1], k[2])][float(labels["le"])] += v
    return out


def _quantile(q: float, new: Mapping[float, float], old: Mapping[float, float] | None = None) -> float | None:
    bounds = sorted(new)
    counts = [new[b] - (old or {}).get(b, 0.0) for b in bounds]
    return histogram_quantile(q, bounds, counts)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


_BY = ("region", "preset", "model")
_VLLM = {"model_name": "model"}


def signals_from_scrapes(before: Scrape, after: Scrape, dt: float, now: float) -> dict[Key, Signals]:
    """Two scrapes ``dt`` seconds apart of the gateway's /metrics (plus /metrics/workers samples, if any).
    "Now" is the interval between them; the baseline the trend compares with is everything before the first
    scrape (the counters' lifetime, whose start the ``_created`` samples give)."""
    ttft0, ttft1 = _buckets(before, "tokengate_time_to_first_token_seconds"), _buckets(
        after, "tokengate_time_to_first_token_seconds")
    tps0, tps1 = _buckets(before, "tokengate_output_tokens_per_second"), _buckets(
        after, "tokengate_output_tokens_per_second")
    req0, req1 = _sum(before, "tokengate_requests_total", _BY), _sum(after, "tokengate_requests_total", _BY)
    created = {k: min(v for _, v in items) for k, items in
               _group(before, "tokengate_requests_created", _BY).items()}
    kv = {k: max(v for _, v in items) for k, items in
          _group(after, "vllm:kv_cache_usage_perc", _BY, rename=_VLLM).items()}
    waiting = _sum(after, "vllm:num_requests_waiting", _BY, rename=_VLLM)
    pre0 = _sum(before, "vllm:num_preemptions_total", _BY, rename=_VLLM)
    pre1 = _sum(after, "vllm:num_preemptions_total", _BY, rename=_VLLM)
    in_flight = _sum(after, "tokengate_requests_in_flight", _BY)
    # caps are decided per pool (model x region): one region's clamps say nothing of another's
    by_pool = ("region", "model")
    m_req0, m_req1 = (_sum(s, "tokengate_requests_total", by_pool) for s in (before, after))
    m_clamp0, m_clamp1 = (_sum(s, "tokengate_cap_clamps_total", by_pool) for s in (before, after))
    m_rej0, m_rej1 = (_sum(s, "tokengate_cap_rejections_total", by_pool) for s in (before, after))
    out: dict[Key, Signals] = {}
    for k in sorted(set(req1) | set(ttft1)):
        if not k[1]:
            continue  # answered before routing: no preset to judge
        key: Key = (k[0], k[1], k[2])
        pool = (k[0], k[2])
        ttft_now = _quantile(0.95, ttft1.get(key, {}), ttft0.get(key))
        tps_now = _quantile(0.5, tps1.get(key, {}), tps0.get(key))
        rate_now = (req1.get(k, 0.0) - req0.get(k, 0.0)) / dt if dt > 0 else None
        start = created.get(k)
        rate_before = req0[k] / (now - dt - start) if k in req0 and start and now - dt - start > 0 else None
        d_req = m_req1.get(pool, 0.0) - m_req0.get(pool, 0.0)
        d_clamp = m_clamp1.get(pool, 0.0) - m_clamp0.get(pool, 0.0)
        out[key] = Signals(
            ttft_p95=ttft_now,
            ttft_p95_ratio=_ratio(ttft_now, _quantile(0.95, ttft0.get(key, {}))),
            tps_p50=tps_now,
            tps_p50_ratio=_ratio(tps_now, _quantile(0.5, tps0.get(key, {}))),
            request_rate=rate_now,
            request_rate_ratio=_ratio(rate_now, rate_before),
            kv_cache_usage=kv.get(k),
            waiting=waiting.get(k),
            preemption_rate=(pre1[k] - pre0.get(k, 0.0)) / dt if k in pre1 and dt > 0 else None,
            clamp_ratio=d_clamp / d_req if d_req > 0 else None,
            rejection_rate=(m_rej1.get(pool, 0.0) - m_rej0.get(pool, 0.0)) / dt if dt > 0 else None,
            in_flight=in_flight.get(k),
        )
    return out
