"""bench/overhead.py: what its report says about the run (the run itself is a benchmark)."""

from __future__ import annotations

from bench.overhead import REGIMES, regimes_for


def test_each_regime_is_labelled_with_the_concurrency_it_runs_at() -> None:
    [paced, saturation] = regimes_for("paced, saturation", 256)
    assert paced.about.endswith(", c=256") and saturation.about.endswith(", c=256")
    assert (paced.ttft, paced.token_delay, paced.tokens) == (0.020, 0.010, 64)
    assert regimes_for("saturation", 64)[0].about == "zero-delay worker, 16 tokens, c=64"
    assert "{c}" in REGIMES["paced"].about  # the table is not mislabelled by a run at another concurrency
