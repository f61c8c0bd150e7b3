from __future__ import annotations

import time

from app.routing import candidates, pick, placements
from app.workers.registry import ModelInfo, Registry, Worker


def registry_with(*specs: tuple[str, str, int]) -> tuple[Registry, list[Worker]]:
    reg = Registry(eject_after=2, eject_base=10.0)
    workers = []
    for name, region, load in specs:
        w = Worker(name=name, url=f"http://127.0.0.1:{9000 + len(workers)}", region=region)
        reg.add(w)
        reg.update(w, ready=True, models={"m": ModelInfo("m", 2048)})
        w.in_flight = load
        workers.append(w)
    return reg, workers


def test_least_in_flight_wins() -> None:
    reg, (a, b, c) = registry_with(("a", "fr", 3), ("b", "fr", 1), ("c", "fr", 2))
    pool = candidates(reg.snapshot, "m", ["fr"])
    assert all(pick(pool, time.monotonic(), turn) is b for turn in range(6))


def test_ties_rotate() -> None:
    reg, workers = registry_with(("a", "fr", 0), ("b", "fr", 0), ("c", "fr", 0))
    pool = candidates(reg.snapshot, "m", ["fr"])
    chosen = {pick(pool, time.monotonic(), turn) for turn in range(3)}
    assert chosen == set(workers)


def test_region_first_then_fallbacks_never_others() -> None:
    reg, (fr, uae) = registry_with(("fr0", "fr", 5), ("uae0", "uae", 0))
    assert candidates(reg.snapshot, "m", ["fr"]) == (fr,)
    assert candidates(reg.snapshot, "m", ["de", "uae"]) == (uae,)
    assert candidates(reg.snapshot, "m", ["de"]) == ()
    assert candidates(reg.snapshot, "other", ["fr"]) == ()


def test_excluded_and_not_ready_are_skipped() -> None:
    reg, (a, b) = registry_with(("a", "fr", 0), ("b", "fr", 5))
    pool = candidates(reg.snapshot, "m", ["fr"])
    assert pick(pool, time.monotonic(), 0, exclude=[a]) is b
    reg.update(b, ready=False, reason="down")
    assert candidates(reg.snapshot, "m", ["fr"]) == (a,)
    assert pick(pool, time.monotonic(), 0, exclude=[a]) is None


def test_repeated_failures_eject_for_a_backoff_but_never_the_last_one() -> None:
    reg, (a, b) = registry_with(("a", "fr", 0), ("b", "fr", 0))
    reg.record_failure(a)
    assert a.routable(time.monotonic())
    reg.record_failure(a)
    assert not a.routable(time.monotonic())
    assert a.routable(time.monotonic() + 11)
    # b fails too: a is still ejected, so b is the last one standing and stays in rotation
    reg.record_failure(b)
    reg.record_failure(b)
    assert b.routable(time.monotonic())
    reg.record_success(a)
    assert a.routable(time.monotonic())


def test_a_health_check_of_a_ready_worker_does_not_clear_its_failures() -> None:
    """A worker that answers /health but whose requests time out: the health loop (every few seconds) cleared its
    count each time, so with a read timeout longer than that it was never ejected. Coming back from not ready does."""
    reg, (a, _b) = registry_with(("a", "fr", 0), ("b", "fr", 0))
    reg.record_failure(a)
    reg.update(a, ready=True)  # the health loop: still ready
    reg.record_failure(a)
    assert not a.routable(time.monotonic())
    reg.update(a, ready=False, reason="down")
    reg.update(a, ready=True)
    reg.record_failure(a)
    assert a.consecutive_failures == 1


def test_the_last_worker_of_a_region_is_never_ejected_for_a_peer_in_another_region() -> None:
    # routing never crosses regions, so a healthy fr worker can't stand in for uae's only one
    reg, (_fr, uae) = registry_with(("fr0", "fr", 0), ("uae0", "uae", 0))
    for _ in range(5):
        reg.record_failure(uae)
    assert uae.routable(time.monotonic())
    assert candidates(reg.snapshot, "m", ["uae"]) == (uae,)


def test_thousands_of_failures_in_a_row_keep_the_backoff_at_its_cap() -> None:
    reg, (a, _) = registry_with(("a", "fr", 0), ("b", "fr", 0))
    for _ in range(1100):  # e.g. a worker resetting 1 100 pending calls at once: 2 ** 1098 overflowed a float
        reg.record_failure(a)
    assert 0 < a.ejected_until - time.monotonic() <= reg.eject_max


def test_a_worker_back_in_rotation_is_asked_for_explicit_aborts_again() -> None:
    reg, (a, _) = registry_with(("a", "fr", 0), ("b", "fr", 0))
    a.explicit_abort = False  # its abort endpoint answered 404 once (maybe while it restarted)
    reg.update(a, ready=True, reason="ready")
    assert not a.explicit_abort  # still the same run of it
    reg.update(a, ready=False, reason="down")
    reg.update(a, ready=True, reason="ready")
    assert a.explicit_abort


def test_snapshot_lists_only_ready_models_with_smallest_window() -> None:
    reg = Registry()
    w1 = Worker(name="a", url="http://127.0.0.1:1")
    w2 = Worker(name="b", url="http://127.0.0.1:2")
    reg.add(w1)
    reg.add(w2)
    reg.update(w1, ready=True, models={"m": ModelInfo("m", 4096)})
    reg.update(w2, ready=True, models={"m": ModelInfo("m", 2048)})
    assert reg.snapshot.models["m"].max_model_len == 2048
    reg.update(w2, ready=False)
    assert reg.snapshot.models["m"].max_model_len == 4096
    assert reg.snapshot.by_model["m"] == (w1,)


def test_pools_and_placements_follow_the_snapshot() -> None:
    reg, (fr, uae) = registry_with(("fr0", "fr", 0), ("uae0", "uae", 0))
    snap = reg.snapshot
    pool = candidates(snap, "m", ["fr"])
    assert candidates(snap, "m", ["fr"]) is pool  # memoized: the same tuple for the same snapshot
    assert placements(snap, pool) == ("fr/external",) == placements(snap, pool)
    assert placements(snap, candidates(snap, "m", None)) == ("fr/external", "uae/external")
    fr2 = Worker(name="fr1", url="http://127.0.0.1:9100", region="fr", preset="1xH100")
    reg.add(fr2)
    reg.update(fr2, ready=True, models={"m": ModelInfo("m", 2048)})
    assert reg.snapshot is not snap  # a new snapshot: pools and placements are worked out again
    assert placements(reg.snapshot, candidates(reg.snapshot, "m", ["fr"])) == ("fr/1xH100", "fr/external")
    assert placements(snap, pool) == ("fr/external",)  # the old snapshot's answer is unchanged
