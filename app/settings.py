"""The one Settings object. Built by the CLI (flags over ``TOKENGATE_*`` env over defaults) or by tests."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .writebatch import MAX_BATCH

CapPolicy = Literal["clamp", "reject"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


def default_state_dir() -> Path:
    return Path.home() / ".cache" / "tokengate"


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One external worker: ``[region[/preset]=]URL``."""

    url: str
    region: str | None
    preset: str | None

    @classmethod
    def parse(cls, text: str) -> UpstreamSpec:
        label, sep, url = text.partition("=")
        region = preset = None
        if sep and "://" not in label:
            region, _, p = label.partition("/")
            preset = p or None
            for part in (region, preset):
                if part is not None and not _NAME.match(part):
                    raise ValueError(f"bad region/preset {part!r} in upstream {text!r}")
        else:
            url = text
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018  # (raises on a port out of range or not a number)
        except ValueError as exc:
            raise ValueError(f"bad port in upstream {text!r}: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"no host in upstream {text!r}")
        return cls(url.rstrip("/"), region, preset)


UNLABELLED_REGION = "local"  # the region of an --upstream given as a bare URL, and the default without --region

# What a managed worker's launch sets and a --worker-env/--worker-arg must not change: each worker has its own GPU
# slice and parallelism from its preset, listens on loopback only, and takes the internal key (vLLM's last flag wins,
# so an appended --host 0.0.0.0 would open a worker to the network).
_MANAGED_ENV = {
    "CUDA_VISIBLE_DEVICES": "each worker's GPU slice; choose the GPUs with --gpus",
    "VLLM_API_KEY": "each worker's internal key",
}
_GATEWAY_SETS = "the gateway sets it for each worker"
_MANAGED_ARGS = {
    "--model": "the model is --model",
    "--served-model-name": "use --served-model-name",
    "--host": "workers listen on loopback only (" + _GATEWAY_SETS + ")",
    "--port": _GATEWAY_SETS + " (a free loopback port)",
    "--uds": "workers listen on a loopback port the gateway picks",
    "--api-key": _GATEWAY_SETS + " (an internal key)",
    "--max-model-len": "use --max-model-len",
    "--tensor-parallel-size": "it comes from the preset (choose another --preset)",
    "-tp": "it comes from the preset (choose another --preset)",
    "--pipeline-parallel-size": "it comes from the preset (choose another --preset)",
    "-pp": "it comes from the preset (choose another --preset)",
    "--data-parallel-size": "the gateway starts one worker per GPU slice and balances across them",
    "-dp": "the gateway starts one worker per GPU slice and balances across them",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENGATE_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    upstream: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="external workers: [region[/preset]=]URL"
    )
    upstream_api_key: str | None = Field(None, description="key the external workers expect (vllm --api-key)")
    tokenizers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="MODEL=PATH: the model's tokenizer files on this machine, for workers on other machines "
                    "(prompts are then counted here, not by a /tokenize call per request)",
    )
    region: str | None = Field(None, min_length=1, max_length=64,
                               description="default region of requests (and of managed workers)")
    region_fallbacks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="FROM=TO[:TO2]: requests for region FROM may use TO when FROM has none"
    )

    # caps: None means "the preset's, else the built-in default" (4096 / 256 / the worker's max_model_len / clamp)
    max_tokens_cap: int | None = Field(None, ge=1)
    default_max_tokens: int | None = Field(None, ge=1, description="lowered to max_tokens_cap when above it")
    context_cap: int | None = Field(None, ge=1)
    cap_policy: CapPolicy | None = None

    # managed workers (the embedded default when neither upstream nor model is given)
    model: str | None = None
    served_model_name: str | None = None
    preset: str | None = Field(None, description="preset name in --region; 'cpu' runs the CPU engine")
    presets: Annotated[list[Path], NoDecode] = Field(default_factory=list, description="extra preset dirs")
    gpus: Annotated[list[int] | None, NoDecode] = None
    replicas: int = Field(1, ge=1, le=64, description="CPU workers to run (preset 'cpu')")
    worker_max_model_len: int | None = Field(None, ge=16)
    worker_extra_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    worker_env: Annotated[list[str], NoDecode] = Field(default_factory=list, description="KEY=VALUE for workers")
    state_dir: Path = Field(default_factory=default_state_dir)
    drain_timeout: float = Field(30.0, ge=0, allow_inf_nan=False,
                                 description="SIGTERM: how long in-flight requests may finish")

    # routing
    prefix_affinity_bytes: int = Field(0, ge=0, description="hash this many leading prompt bytes to pick a "
                                                           "worker (vLLM prefix cache); 0 = off")

    # upstream transport
    connect_timeout: float = Field(5.0, gt=0, allow_inf_nan=False)
    read_timeout: float = Field(600.0, gt=0, allow_inf_nan=False,
                                description="time allowed for the worker's response headers and its first token")
    stream_idle_timeout: float = Field(120.0, gt=0, allow_inf_nan=False,
                                       description="longest silence allowed mid-stream")
    non_stream_upstream: Literal["stream", "unary"] = Field(
        "stream", description="how a non-streaming request is asked of the worker: 'stream' (the answer is "
        "gathered from the worker's stream: decode-speed metrics, the idle timeout, and an abort the worker can't "
        "miss) or 'unary' (the worker's own JSON answer passed through: several times less gateway CPU per "
        "request; read_timeout bounds the whole answer; tokens generated for a client that left are not known)")
    write_timeout: float = Field(30.0, gt=0, description="longest a client may leave a stream unread before "
                                                        "it is dropped and the worker request aborted")
    discovery_interval: float = Field(5.0, gt=0)
    retry_attempts: int = Field(3, ge=1, description="workers tried before the first byte")

    # request limits
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    header_timeout: float = Field(10.0, gt=0, description="time a client has to send its request headers")
    body_timeout: float = Field(30.0, gt=0, description="time a client has to send its request body")
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    max_headers: int = Field(100, ge=8)
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="proxies whose X-Forwarded-* headers are trusted (default: none)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="web page origins allowed to call from a browser ('*': any; default: none)"
    )
    tokenize_offloop_bytes: int = Field(4 * 1024, ge=0, description="prompts larger than this tokenise in a thread "
                                                                    "(4 KiB: at most ~2 ms of tokenising on the loop)")

    # tenancy and admission
    keys_file: Path | None = Field(None, description="API keys (hashes) and per-key limits; unset: OPEN mode")
    redis_url: str | None = Field(None, description="share rate limits across gateway replicas")
    redis_fail_open: bool = Field(False, description="while the limits' Redis cannot be reached, admit requests "
                                                     "unmetered (logged) instead of answering 503")
    worker_concurrency: int = Field(256, ge=1, description="requests in flight per worker before queueing")
    queue_size: int = Field(1024, ge=0, description="requests waiting per worker pool before 429")
    queue_timeout: float = Field(30.0, gt=0, description="longest wait in the queue before 503")

    # request policy
    max_n: int = Field(8, ge=1)
    max_logprobs: int = Field(20, ge=0)
    allow_fields: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         description="vLLM-only fields to let through")
    allow_unknown_fields: bool = False
    allow_remote_media: bool = False

    workers: int = Field(1, ge=1, le=64, description="gateway processes sharing the port (external workers only)")
    busy_poll: float = Field(0.0, ge=0, le=60, description="at light load (1-4 requests in flight), poll instead "
                                                           "of sleeping, and this many seconds after the last: a "
                                                           "CPU core per process for the wake-up latency of an "
                                                           "idle one; 0 = off")
    write_batch: int = Field(MAX_BATCH, ge=1, le=1024,
                             description="socket writes of one event-loop pass held and issued together, at most "
                                         "this many (app.writebatch); 1 = each at once")
    gc_freeze: bool = Field(True, description="move start-up objects out of the garbage collector's reach")
    dry_run: bool = Field(False, description="print the worker command lines and environment, start nothing")
    admin_key: str | None = Field(None, description="bearer key for /admin/*; unset: loopback clients only")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False

    _split = field_validator("upstream", "worker_extra_args", "worker_env", "region_fallbacks", "presets",
                             "forwarded_allow_ips", "cors_origins", "tokenizers",
                             "allow_fields", mode="before")(_split_list)

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_list(cls, value: object) -> object:
        items = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(items, list):
            return value
        if not all(str(x).isdigit() for x in items):  # (isdigit: no sign, no space, no UUID)
            raise ValueError(f"GPU indices are comma-separated integers from 0, as nvidia-smi numbers them "
                             f"(got {','.join(map(str, items))[:80]!r})")
        gpus = [int(x) for x in items]
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"a GPU is named twice (got {','.join(map(str, gpus))})")
        return gpus

    @field_validator("upstream")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            UpstreamSpec.parse(url)
        return urls

    @field_validator("upstream_api_key")
    @classmethod
    def _api_key(cls, key: str | None) -> str | None:
        if key is not None and not (key.isascii() and key.isprintable()):
            raise ValueError("must be printable ASCII (it goes into an HTTP header)")
        return key

    @field_validator("worker_env")
    @classmethod
    def _env(cls, items: list[str]) -> list[str]:
        for item in items:
            name = item.partition("=")[0]
            if "=" not in item or not name:
                raise ValueError(f"worker env {item!r} is not KEY=VALUE")
            if name in _MANAGED_ENV:
                raise ValueError(f"worker env {name} is the gateway's to set ({_MANAGED_ENV[name]})")
        return items

    @field_validator("worker_extra_args")
    @classmethod
    def _worker_args(cls, items: list[str]) -> list[str]:
        for item in items:
            flag = item.partition("=")[0].replace("_", "-")  # vLLM takes --max_model_len for --max-model-len too
            # argparse also takes a long flag's unambiguous prefix (--hos for --host)
            managed = next((f for f in _MANAGED_ARGS if f == flag or (len(flag) > 4 and f.startswith(flag))), None)
            if managed is not None:
                raise ValueError(f"worker arg {item!r}: {_MANAGED_ARGS[managed]}")
        return items

    @field_validator("tokenizers")
    @classmethod
    def _tokenizer_paths(cls, items: list[str]) -> list[str]:
        from .tokenizer import has_local_tokenizer  # here: settings load before the tokenizer machinery is needed

        for item in items:
            model, sep, path = item.partition("=")
            if not sep or not model or not path:
                raise ValueError(f"tokenizer {item!r} is not MODEL=PATH")
            if not has_local_tokenizer(path):
                raise ValueError(f"tokenizer {item!r}: no tokenizer.json in {path}")
        return items

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.fallbacks()  # validates the syntax
        if self.preset is not None and self.region is None and self.preset != "cpu":
            raise ValueError("--preset needs --region (presets are defined per region)")
        return self

    @property
    def default_region(self) -> str:
        """``--region``; without it, the one region every ``--upstream`` names (``fr=URL``, ``fr/h100-1x=URL``),
        else ``local`` (where unlabelled upstreams are)."""
        if self.region is not None:
            return self.region
        named = {u.region for u in self.upstreams()}
        if len(named) == 1 and None not in named:
            return named.pop() or UNLABELLED_REGION
        return UNLABELLED_REGION

    def upstreams(self) -> list[UpstreamSpec]:
        return [UpstreamSpec.parse(u) for u in self.upstream]

    def fallbacks(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for item in self.region_fallbacks:
            src, sep, dst = item.partition("=")
            targets = [t for t in dst.split(":") if t]
            if not sep or not _NAME.match(src) or not targets or not all(_NAME.match(t) for t in targets):
                raise ValueError(f"region fallback {item!r} is not FROM=TO[:TO2...]")
            out.setdefault(src, []).extend(targets)
        return out

    def tokenizer_paths(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.tokenizers)

    def worker_environment(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.worker_env)


def describe_errors(exc: ValidationError) -> str:
    """A ``ValidationError`` as lines a user reads: ``  replicas: Input should be ... (got 0)`` — without pydantic's
    documentation links and error types."""
    lines = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "settings"
        msg = str(err["msg"]).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if err["type"] == "value_error" or isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)
