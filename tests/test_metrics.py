"""GatewayMetrics: what one request's end adds, and the relay histogram's per-chunk observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest

from app.metrics import GatewayMetrics
from app.sse import _RELAY_BOUNDS, SSEState


def test_a_stream_s_chunk_times_are_one_observation_each() -> None:
    rng = random.Random(7)
    times = [rng.choice([2e-6, 1e-5, 3e-5, 1e-4, 2e-3, 0.3, 5.0]) * rng.uniform(0.5, 1.5) for _ in range(200)]
    times += [0.00025, 1e-5]  # exactly on a bound: in that bucket (le), as observe() puts it
    batched, single = GatewayMetrics(CollectorRegistry()), GatewayMetrics(CollectorRegistry())
    st = SSEState()
    for t in times:
        st.relayed(t)
        single.overhead.labels("relay").observe(t)
    batched.observe_relay(st.relay_buckets, st.relay_seconds)
    assert st.chunks == len(times)

    def relay_lines(m: GatewayMetrics) -> list[bytes]:
        return [line for line in generate_latest(m.registry).splitlines()
                if b'phase="relay"' in line and b"_created" not in line]

    assert relay_lines(batched) == relay_lines(single)
    # observe_relay writes prometheus-client's own bucket values (private): one per bound, as sse counts them
    assert len(batched.overhead.labels("relay")._buckets) == len(_RELAY_BOUNDS)
    assert b'tokengate_gateway_overhead_seconds_count{phase="relay"} 202.0' in relay_lines(batched)
