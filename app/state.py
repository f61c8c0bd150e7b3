"""What the lifespan builds and the routes read: one object, no globals."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from .exposition import Exposition
from .metrics import GatewayMetrics
from .proxy import Proxy
from .settings import Settings
from .tokenizer import TokenizerStore
from .upstream import UpstreamPool
from .workers.health import HealthChecker
from .workers.registry import Registry
from .workers.supervisor import Supervisor

WORKER_SERIES = 32_768  # /metrics/workers' label cache: 16 vLLM workers of ~2 000 series


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    pool: UpstreamPool
    prom_registry: CollectorRegistry
    metrics: GatewayMetrics
    tokenizers: TokenizerStore
    proxy: Proxy
    health: HealthChecker
    supervisor: Supervisor | None = None
    started_at: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    exposition: Exposition = field(default_factory=Exposition)  # /metrics' text, its series' labels kept
    # /metrics/workers' own: its series are the workers' (their label values are theirs to choose), so a small
    # bound keeps what a worker with a label of many values can make it hold
    worker_exposition: Exposition = field(default_factory=lambda: Exposition(max_series=WORKER_SERIES))
