"""What `tokengate serve` will run: settings + presets catalog + this machine → worker specs.

Modes: ``--upstream`` only (external workers, nothing launched); ``--model`` with ``--region``/``--preset``
(managed GPU workers, or ``--preset cpu`` for the CPU engine); neither (the embedded default: a tiny generated
model on one CPU worker). Upstreams and managed workers may be mixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .caps import CapConfig
from .presets import Catalog, Preset
from .settings import Settings
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
    if settings.model is None:
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
    found = settings.gpus if settings.gpus is not None else gpus()
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
