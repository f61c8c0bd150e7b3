"""What `tokengate serve` will run: settings + presets catalog + this machine → worker specs.

Modes: ``--upstream`` only (external workers, nothing launched); ``--model`` with ``--region``/``--preset``
(managed GPU workers, or ``--preset cpu`` for the CPU engine); neither (the embedded default: a tiny generated
model on one CPU worker). Upstreams and managed workers may be mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .caps import CapConfig
from .presets import Catalog, Preset
from .settings import Settings
from .workers.launch import COMMON_ENV
from .workers.plan import (
    CPU_PRESET,
    ModelSpec,
    PlanError,
    detect_gpus,
    multinode_commands,
    plan_cpu_workers,
    plan_gpu_workers,
)
from .workers.supervisor import WorkerSpec

if TYPE_CHECKING:
    from .modelshape import ModelShape

TINY_MODEL_NAME = "tiny-llama"
CPU_MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Deployment:
    settings: Settings
    specs: list[WorkerSpec]
    preset: Preset | None
    notes: list[str]


def preset_caps(catalog: Catalog) -> dict[str, CapConfig]:
    return {
        p.key: CapConfig(p.caps.max_tokens_cap, p.caps.default_max_tokens, p.caps.context_cap, p.caps.cap_policy)
        for p in catalog.presets()
    }


def plan_deployment(settings: Settings, catalog: Catalog, *, dry_run: bool = False,
                    gpus: Callable[[], list[int]] = detect_gpus) -> Deployment:
    notes: list[str] = []
    if settings.upstream and settings.model is None and settings.preset is None:
        return Deployment(settings, [], None, notes)
    embedded = settings.model is None
    if embedded:
        if settings.preset not in (None, CPU_PRESET):
            raise PlanError("--preset needs --model (a model directory)")
        from .tinymodel import build_tiny_model

        path = settings.state_dir / "models" / TINY_MODEL_NAME
        if not dry_run:
            build_tiny_model(path)
        notes.append(f"no --model given: serving the tiny generated test model ({path}) on the CPU engine")
        settings = settings.model_copy(update={
            "model": str(path), "served_model_name": settings.served_model_name or TINY_MODEL_NAME,
            "preset": CPU_PRESET,
        })
    assert settings.model is not None
    model_path = settings.model
    if Path(model_path).name == "config.json" and Path(model_path).is_file():
        model_path = str(Path(model_path).parent)  # the picker's other way of naming the same model: its directory
    model = ModelSpec(
        path=model_path,
        served_name=settings.served_model_name or Path(model_path.rstrip("/")).name,
        max_model_len=settings.worker_max_model_len,
        extra_args=tuple(settings.worker_extra_args),
    )
    log_dir = settings.state_dir / "logs"
    extra_env = settings.worker_environment()
    if not embedded:
        try:
            _check_model_source(model.path, extra_env)
        except PlanError as exc:
            if not dry_run:
                raise
            notes.append(f"{exc}: workers started here would fail (the dry-run shows the plan all the same)")
    if settings.preset == CPU_PRESET:
        found: list[int] = []  # (GPUs are none of its business)
    elif settings.gpus is not None:
        found = _check_gpus_exist(settings.gpus, gpus)
    else:
        found = gpus()
    if settings.preset is None:
        if found:
            raise PlanError(
                f"this machine has {len(found)} GPU(s): choose a preset with --region R --preset NAME "
                "(`tokengate presets pick --model ... --region R` does the memory math)"
            )
        settings = settings.model_copy(update={"preset": CPU_PRESET})
    if settings.preset == CPU_PRESET:
        region = settings.default_region
        model = ModelSpec(model.path, model.served_name, model.max_model_len or CPU_MAX_MODEL_LEN, model.extra_args)
        specs = plan_cpu_workers(model, region=region, replicas=settings.replicas, log_dir=log_dir,
                                 extra_env=extra_env)
        return Deployment(settings.model_copy(update={"region": region}), specs, None, notes)
    assert settings.region is not None and settings.preset is not None
    preset = catalog.get(settings.region, settings.preset)
    shape = _check_parallelism(model.path, preset, catalog)
    if (shape is not None and model.max_model_len is not None and model.max_model_len > shape.max_model_len
            and _worker_env(extra_env).get("VLLM_ALLOW_LONG_MAX_MODEL_LEN") != "1"):
        raise PlanError(f"--max-model-len {model.max_model_len} is above {model.path}'s own context of "
                        f"{shape.max_model_len} tokens: vLLM refuses to start with it (unless told otherwise: "
                        "--worker-env VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
    if shape is not None and model.max_model_len is None and shape.max_model_len < preset.max_model_len:
        notes.append(f"{model.path}: the model's own context is {shape.max_model_len} tokens, below preset "
                     f"{preset.key}'s max_model_len {preset.max_model_len}: workers get --max-model-len "
                     f"{shape.max_model_len} (vLLM refuses to start with more)")
        model = replace(model, max_model_len=shape.max_model_len)
    if preset.nodes > 1:
        if not dry_run:
            raise PlanError(
                f"preset {preset.key} spans {preset.nodes} nodes: start it on a Ray cluster (the commands: "
                f"`tokengate serve --dry-run --region {preset.region} --preset {preset.name} --model ...`) and "
                f"point the gateway at it with --upstream {preset.key}=http://HEAD:8000"
            )
        notes.append(multinode_commands(preset, model))
        return Deployment(settings, [], preset, notes)
    if not found and dry_run:
        found = list(range(preset.gpus))
        notes.append(f"no GPU detected: showing the layout for {preset.gpus} GPU(s) (pass --gpus to choose)")
    specs = plan_gpu_workers(preset, model, found, log_dir=log_dir, extra_env=extra_env)
    if len(found) % preset.gpus:
        notes.append(f"{len(found) % preset.gpus} GPU(s) left idle: {len(found)} is not a multiple of "
                     f"{preset.gpus}")
    return Deployment(settings, specs, preset, notes)


def _check_parallelism(model: str, preset: Preset, catalog: Catalog) -> ModelShape | None:
    """A model in a local directory whose heads or layers can't be split the preset's way fails at start (vLLM would
    fail later, on every worker): a ``PresetError`` naming the preset's file, the preset and the field. A model
    vLLM fetches by name, or whose config can't be read here, is left to vLLM (None); else its shape."""
    from .modelshape import ModelConfigError, load_model_shape
    from .picker import check_model_fits_parallelism

    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    try:
        shape = load_model_shape(config)
    except ModelConfigError:
        return None
    check_model_fits_parallelism(shape, preset, catalog.sources.get((preset.region, preset.name)))
    return shape


def _check_model_source(model: str, worker_env: dict[str, str]) -> None:
    """A model workers can load, or a ``PlanError`` now: a directory with a readable ``config.json``, or a Hugging
    Face name already in the cache (workers run offline unless ``--worker-env HF_HUB_OFFLINE=0``). Else every worker
    would fail at start, over and over."""
    path = Path(model).expanduser()
    if path.is_dir():
        config = path / "config.json"
        try:
            doc = json.loads(config.read_text())
        except FileNotFoundError:
            raise PlanError(f"--model {model}: no config.json in it (a model directory, as save_pretrained writes "
                            "one)") from None
        except (OSError, ValueError) as exc:
            raise PlanError(f"--model {model}: cannot read {config}: {exc}") from None
        if not isinstance(doc, dict):
            raise PlanError(f"--model {model}: {config} is not a JSON object")
        return
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise PlanError(f"--model {model}: no such model directory")
    env = _worker_env(worker_env)
    if env.get("HF_HUB_OFFLINE", "1").lower() in ("0", "false", "no", "off", ""):
        return  # workers may download it
    cache = _hf_cache(env)
    if not (cache / ("models--" + model.replace("/", "--"))).is_dir():
        raise PlanError(f"--model {model}: no such directory, and not in the Hugging Face cache ({cache}); workers "
                        "run offline (HF_HUB_OFFLINE=1): pass a model directory, download it first, or allow "
                        "downloads with --worker-env HF_HUB_OFFLINE=0")


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment a worker will have (``launch``: the gateway's, the workers' common one, ``--worker-env``)."""
    return {**os.environ, **COMMON_ENV, **extra}


def _hf_cache(env: dict[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def _check_gpus_exist(chosen: list[int], detect: Callable[[], list[int]]) -> list[int]:
    """``--gpus``, once checked against the GPUs this machine has where it can tell (nvidia-smi, or
    CUDA_VISIBLE_DEVICES)."""
    try:
        present = detect()
    except PlanError:  # CUDA_VISIBLE_DEVICES by UUID: no telling, and --gpus gives each worker its own anyway
        return chosen
    missing = [g for g in chosen if g not in present]
    if present and missing:
        raise PlanError(f"--gpus {','.join(map(str, chosen))}: no GPU {','.join(map(str, missing))} on this machine "
                        f"(it has {','.join(map(str, present))})")
    return chosen
