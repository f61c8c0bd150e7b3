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
