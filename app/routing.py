"""(model, region, snapshot of workers) → worker. Pure: no I/O, no clock of its own.

Least requests in flight wins; ties rotate so idle workers share the work. A worker the caller already tried
(``exclude``) or one ejected for failing is skipped.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .workers.registry import Snapshot, Worker


def candidates(snapshot: Snapshot, model: str, regions: Sequence[str] | None) -> tuple[Worker, ...]:
    pool = snapshot.by_model.get(model, ())
    if regions is None:
        return pool
    for region in regions:  # the request's region first, then allowed fallbacks in order
        local = tuple(w for w in pool if w.region == region)
        if local:
            return local
    return ()


def pick(pool: Sequence[Worker], now: float, turn: int, exclude: Collection[Worker] = ()) -> Worker | None:
    best: Worker | None = None
    best_load = 1 << 62
    n = len(pool)
    if n == 0:
        return None
    start = turn % n
    for i in range(n):
        w = pool[(start + i) % n]
        if w in exclude or not w.routable(now):
            continue
        if w.in_flight < best_load:
            best, best_load = w, w.in_flight
    return best
