"""(model, region, snapshot of workers) → worker. Pure: no I/O, no clock of its own.

Least requests in flight wins; ties rotate so idle workers share the work. A worker the caller already tried
(``exclude``) or one ejected for failing is skipped.

Prefix affinity (optional): requests whose prompts start alike carry the same ``affinity`` key and prefer the
same worker (rendezvous hashing), so vLLM's prefix cache hits — but only while that worker's load stays within
``(1 + epsilon)`` of the pool's average (consistent hashing with bounded loads): one hot prefix can't take
everything.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Iterable, Sequence

from .protocol import ParsedRequest
from .workers.registry import Snapshot, Worker


def candidates(snapshot: Snapshot, model: str, regions: Sequence[str] | None) -> tuple[Worker, ...]:
    pool = snapshot.by_model.get(model, ())
    if regions is None:
        return pool
    memo = snapshot.by_region
    for region in regions:  # the request's region first, then allowed fallbacks in order
        local = memo.get((model, region))
        if local is None:
            local = memo[(model, region)] = tuple(w for w in pool if w.region == region)
        if local:
            return local
    return ()


def placements(snapshot: Snapshot, pool: tuple[Worker, ...]) -> tuple[str, ...]:
    """The sorted ``region/preset`` names of a pool (what its caps depend on), once per pool and snapshot."""
    hit = snapshot.placements.get(id(pool))
    if hit is not None and hit[0] is pool:
        return hit[1]
    names = placement_names(pool)
    snapshot.placements[id(pool)] = (pool, names)
    return names


def placement_names(workers: Iterable[Worker]) -> tuple[str, ...]:
    return tuple(sorted({f"{w.region}/{w.preset}" for w in workers}))


def pool_labels(names: tuple[str, ...]) -> tuple[str, str]:
    """The (region, preset) labels of a pool from its placement names: each one's, or "mixed" for several."""
    regions = {n.partition("/")[0] for n in names}
    presets = {n.partition("/")[2] for n in names}
    return (regions.pop() if len(regions) == 1 else "mixed", presets.pop() if len(presets) == 1 else "mixed")


def affinity_key(prefix: bytes) -> int:
    return zlib.crc32(prefix)


def affinity_for(req: ParsedRequest, limit: int) -> int:
    """The affinity key of a request: its first ``limit`` prompt bytes (system prompt first, for chats)."""
    if req.route == "chat":
        parts: list[str] = []
        size = 0
        for m in req.body["messages"]:
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
                size += len(content)
            if size >= limit:
                break
        return affinity_key("\x00".join(parts).encode("utf-8", "surrogatepass")[:limit])
    prompt = req.body["prompt"]
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else str(prompt[:limit])
    return affinity_key(str(prompt).encode("utf-8", "surrogatepass")[:limit])


def pick(pool: Sequence[Worker], now: float, turn: int, exclude: Collection[Worker] = (),
         affinity: int | None = None, epsilon: float = 0.25) -> Worker | None:
    n = len(pool)
    if n == 0:
        return None
    live = [w for w in pool if w not in exclude and w.routable(now)]
    if not live:
        return None
    if affinity is not None and len(live) > 1:
        total = sum(w.in_flight for w in live)
        bound = math.ceil((1 + epsilon) * (total + 1) / len(live))
        for w in sorted(live, key=lambda w: zlib.crc32(w.name.encode(), affinity), reverse=True):
            if w.in_flight < bound:
                return w
    best: Worker | None = None
    best_load = 1 << 62
    start = turn % len(live)
    for i in range(len(live)):
        w = live[(start + i) % len(live)]
        if w.in_flight < best_load:
            best, best_load = w, w.in_flight
    return best
