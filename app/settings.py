"""The one Settings object. Built by the CLI (flags over ``TOKENGATE_*`` env over defaults) or by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CapPolicy = Literal["clamp", "reject"]


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


def default_state_dir() -> Path:
    return Path.home() / ".cache" / "tokengate"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENGATE_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    upstream: Annotated[list[str], NoDecode] = Field(default_factory=list)
    upstream_api_key: str | None = Field(None, description="key the external workers expect (vllm --api-key)")
    region: str = Field("local", min_length=1, max_length=64, description="default region of requests")

    # caps (None: no gateway cap beyond the worker's max_model_len)
    max_tokens_cap: int | None = Field(4096, ge=1)
    default_max_tokens: int | None = Field(256, ge=1, description="lowered to max_tokens_cap when above it")
    context_cap: int | None = Field(None, ge=1)
    cap_policy: CapPolicy = "clamp"

    # managed workers (the embedded default when neither upstream nor model is given)
    model: str | None = None
    served_model_name: str | None = None
    worker_max_model_len: int = Field(2048, ge=16)
    worker_extra_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_startup_timeout: float = Field(300.0, gt=0)
    state_dir: Path = Field(default_factory=default_state_dir)

    # upstream transport
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(600.0, gt=0, description="time allowed for the worker's response headers")
    stream_idle_timeout: float = Field(120.0, gt=0, description="longest silence allowed mid-stream")
    discovery_interval: float = Field(5.0, gt=0)
    retry_attempts: int = Field(3, ge=1, description="workers tried before the first byte")

    # request limits
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    tokenize_offloop_bytes: int = Field(16 * 1024, ge=0, description="prompts larger than this tokenise in a thread")

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False

    _split_upstream = field_validator("upstream", "worker_extra_args", mode="before")(_split_list)

    @field_validator("upstream")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        out = []
        for url in urls:
            if not url.startswith(("http://", "https://")):
                url = "http://" + url
            out.append(url.rstrip("/"))
        return out

    @model_validator(mode="after")
    def _caps_consistent(self) -> Settings:
        if self.upstream and self.model:
            raise ValueError("give either upstream (external workers) or model (managed workers), not both")
        return self
