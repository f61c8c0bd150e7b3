"""bench/scrapelag.py: the registries it fills and the figures it writes."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import generate_latest

from app.worker_metrics import relabel
from bench.scrapelag import filled, main, relabel_before, vllm_scrapes


def test_a_registry_grows_with_its_workers_as_a_gateways_does() -> None:
    one, two, four = (generate_latest(filled(n)).count(b"\n") for n in (1, 2, 4))
    assert 200 < one < two and four - one == 3 * (two - one)  # the same lines for each added worker
    assert b'worker="fr-h100-1x-3"' in generate_latest(filled(4))


def test_it_writes_both_arms_per_worker_count(tmp_path: Path, capsys: object) -> None:
    main(["--workers", "1,2", "--rounds", "2", "--out", str(tmp_path)])
    (out,) = tmp_path.glob("scrapelag-*.json")
    rows = json.loads(out.read_text())["rows"]
    assert [(r["endpoint"], r["workers"]) for r in rows] == [("metrics", 1), ("metrics", 2), ("workers", 1),
                                                             ("workers", 2)]
    assert rows[0]["lines"] < rows[1]["lines"] and rows[2]["lines"] < rows[3]["lines"]
    for r in rows:
        for arm in ("old", "new"):
            assert r[f"{arm}_ms"] > 0 and r[f"{arm}_worst_lag_ms"] >= r[f"{arm}_median_lag_ms"] >= 0


def test_the_workers_arm_before_gives_the_same_text_as_the_gateway_now() -> None:
    scrapes = vllm_scrapes(3)
    assert relabel_before(scrapes) == relabel(scrapes)
    assert relabel(scrapes).count(b'worker="fr-h100-1x-2"') > 200


def test_the_multiprocess_arm_merges_real_processes_files(tmp_path: Path) -> None:
    main(["--workers", "1", "--rounds", "1", "--endpoints", "multiprocess", "--processes", "2", "--out", str(tmp_path)])
    (out,) = tmp_path.glob("scrapelag-*.json")
    [row] = json.loads(out.read_text())["rows"]
    assert (row["endpoint"], row["workers"], row["processes"]) == ("multiprocess", 1, 2)
    assert row["lines"] > 200 and row["old_ms"] > 0 and row["new_ms"] > 0
