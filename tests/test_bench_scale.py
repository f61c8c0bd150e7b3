"""bench/scale.py's own logic: the CPU lists it pins to, and reading the gateway's counts from /metrics text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from app.metrics import GatewayMetrics, RequestRecord
from bench.scale import cpu_list, parse_counts


def test_cpu_list() -> None:
    assert cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    assert cpu_list("5") == [5]
    assert cpu_list("12-15") == [12, 13, 14, 15]


def _record(status: int, completion: int | None) -> RequestRecord:
    return RequestRecord("chat", "tiny", "local", "cpu", "w0", status, 1.0, 1.5, 1.1, 1.4, 7, completion)


def test_parse_counts_reads_what_the_gateway_exports() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    for _ in range(3):
        metrics.observe_request(_record(200, 16))
    metrics.observe_request(_record(400, None))  # refused: not an answered request, no tokens
    metrics.observe_request(_record(502, 5))  # cut short: its streamed tokens still count
    counts = parse_counts(generate_latest(registry).decode())
    assert counts == {"requests": 3.0, "completion_tokens": 53.0}


def test_parse_counts_of_nothing() -> None:
    assert parse_counts("# HELP x\n") == {"requests": 0.0, "completion_tokens": 0.0}
