"""GPU presets as data: GPU types, regions and presets loaded from ``presets/*.yaml`` into frozen models.

Every file may hold any of these top-level keys (keys starting ``x-`` are ignored: they hold YAML anchors)::

    gpus:
      h100: {display_name: NVIDIA H100 80GB HBM3, memory_bytes: 85_017_493_504, max_per_node: 8}
    regions:
      fr:
        display_name: France
        default: true
        presets:
          h100-2x: {gpu_type: h100, gpus: 2, tensor_parallel_size: 2, ...}

``load_catalog(dirs)`` reads each directory in order (the built-in one first, then each ``--presets DIR``), its
``*.yaml``/``*.yml`` files sorted by name. A later file may add GPU types, regions and presets; the same GPU type or
the same region + preset name replaces the earlier one; region metadata given later replaces what came before.

Any problem is one ``PresetError`` whose text names the file, the region/preset and the field.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

CapPolicy = Literal["clamp", "reject"]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
# int8: W8A8 checkpoints (vLLM reads the scheme from the checkpoint); awq/gptq: 4-bit weight-only
Quantization = Literal["fp8", "int8", "awq", "gptq"]
KvCacheDtype = Literal["auto", "fp8"]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)]
_M = TypeVar("_M", bound=BaseModel)


class PresetError(ValueError):
    """A preset, region or GPU type that cannot be used; ``str()`` names the file, the preset and the field."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        region: str | None = None,
        preset: str | None = None,
        field: str | None = None,
    ) -> None:
        where = [str(path)] if path is not None else []
        if region is not None or preset is not None:
            where.append(f"preset {region or '?'}/{preset}" if preset is not None else f"region {region}")
        if field is not None:
            where.append(f"field {field}")
        super().__init__(": ".join([*where, message]))
        self.path, self.region, self.preset, self.field, self.detail = path, region, preset, field, message


class UnknownPreset(LookupError):
    """No such region or preset; the message lists the valid names."""


class _FieldProblem(ValueError):
    # raised inside validators so the loader can name the field (pydantic gives model validators an empty loc)
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class GpuType(_Config):
    name: Name
    display_name: str
    memory_bytes: int = Field(gt=0, description="total memory CUDA reports (torch total_memory)")
    max_per_node: int = Field(8, ge=1)


class PresetCaps(_Config):
    """Gateway caps a preset suggests; ``tokengate serve`` flags override them. ``context_cap`` None: max_model_len."""

    max_tokens_cap: int = Field(ge=1)
    default_max_tokens: int = Field(ge=1)
    context_cap: int | None = Field(None, ge=1)
    cap_policy: CapPolicy = "clamp"

    @model_validator(mode="after")
    def _consistent(self) -> PresetCaps:
        if self.default_max_tokens > self.max_tokens_cap:
            raise _FieldProblem(
                "default_max_tokens",
                f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_cap ({self.max_tokens_cap})",
            )
        return self


class Preset(_Config):
    """One way to run a model: GPUs, parallelism, vLLM engine limits and gateway caps."""

    region: Name
    name: Name
    description: str = ""
    gpu_type: Name
    gpus: int = Field(ge=1, description="GPUs in all, over every node")
    nodes: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    max_model_len: int = Field(ge=16)
    max_num_seqs: int = Field(ge=1)
    dtype: Dtype | None = None
    quantization: Quantization | None = None
    kv_cache_dtype: KvCacheDtype | None = None
    caps: PresetCaps

    @property
    def key(self) -> str:
        return f"{self.region}/{self.name}"

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if tp * pp != self.gpus:
            raise _FieldProblem(
                "tensor_parallel_size",
                f"tensor_parallel_size × pipeline_parallel_size = {tp} × {pp} = {tp * pp}, but gpus = {self.gpus}",
            )
        if self.gpus % self.nodes:
            raise _FieldProblem("nodes", f"{self.gpus} GPUs do not split evenly over {self.nodes} nodes")
        if self.caps.context_cap is not None and self.caps.context_cap > self.max_model_len:
            raise _FieldProblem(
                "caps.context_cap",
                f"context_cap ({self.caps.context_cap}) is above max_model_len ({self.max_model_len})",
            )
        if self.caps.max_tokens_cap > self.max_model_len:
            raise _FieldProblem(
                "caps.max_tokens_cap",
                f"max_tokens_cap ({self.caps.max_tokens_cap}) is above max_model_len ({self.max_model_len})",
            )
        return self


class Region(_Config):
    name: Name
    display_name: str
    default: bool = False
    presets: Mapping[str, Preset]


class _RegionFile(_Config):
    display_name: str | None = None
    default: bool | None = None
    presets: dict[Name, dict[str, Any]] = Field(default_factory=dict)


class _File(_Config):
    gpus: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    regions: dict[Name, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every GPU type and region known after loading; presets within a region sort smallest first."""

    gpus: Mapping[str, GpuType]
    regions: Mapping[str, Region]
    sources: Mapping[tuple[str, str], Path]  # (region, preset) → the file that defined it

    @property
    def default_region(self) -> str | None:
        return next((r.name for r in self.regions.values() if r.default), None)

    def region(self, region: str) -> Region:
        try:
            return self.regions[region]
        except KeyError:
            raise UnknownPreset(f"unknown region {region!r}; regions: {', '.join(self.regions) or '(none)'}") from None

    def get(self, region: str, name: str) -> Preset:
        presets = self.region(region).presets
        try:
            return presets[name]
        except KeyError:
            valid = ", ".join(p.name for p in self.presets(region)) or "(none)"
            raise UnknownPreset(f"unknown preset {name!r} in region {region!r}; presets: {valid}") from None

    def presets(self, region: str | None = None) -> tuple[Preset, ...]:
        regions = [self.region(region)] if region is not None else list(self.regions.values())
        return tuple(p for r in regions for p in sorted(r.presets.values(), key=self.size_key))

    def gpu(self, preset: Preset) -> GpuType:
        return self.gpus[preset.gpu_type]

    def size_key(self, preset: Preset) -> tuple[int, int, str]:
        """Fewest GPUs first; then the GPU with less memory; then by name."""
        return (preset.gpus, self.gpus[preset.gpu_type].memory_bytes, preset.name)


def builtin_presets_dir(override: Path | None = None) -> Path:
    """The repository's ``presets/`` directory next to the ``app`` package, or ``override`` when one is given."""
    if override is not None:
        return override
    return Path(__file__).resolve().parent.parent / "presets"


def load_catalog(dirs: Sequence[Path]) -> Catalog:
    gpus: dict[str, GpuType] = {}
    display: dict[str, str] = {}
    default: dict[str, tuple[bool, Path]] = {}
    presets: dict[tuple[str, str], tuple[Preset, Path]] = {}
    for path in _files(dirs):
        data = _parse(path)
        for name, body in data.gpus.items():
            gpus[name] = _validate(GpuType, body, {"name": name}, path=path)
        for region, raw in data.regions.items():
            rfile = _validate(_RegionFile, raw, {}, path=path, region=region)
            display.setdefault(region, region)
            if rfile.display_name is not None:
                display[region] = rfile.display_name
            if rfile.default is not None:
                default[region] = (rfile.default, path)
            for name, body in rfile.presets.items():
                keys = {"region": region, "name": name}
                preset = _validate(Preset, body, keys, path=path, region=region, preset=name)
                presets[(region, name)] = (preset, path)
    defaults = sorted((path, region) for region, (is_default, path) in default.items() if is_default)
    if len(defaults) > 1:
        listed = ", ".join(f"{region} ({path})" for path, region in defaults)
        path, region = defaults[-1]
        raise PresetError(f"more than one default region: {listed}", path=path, region=region, field="default")
    for preset, path in presets.values():
        _check_gpu(preset, gpus, path)
    regions = {
        region: Region(
            name=region,
            display_name=display[region],
            default=default.get(region, (False, None))[0],
            presets={n: p for (r, n), (p, _) in presets.items() if r == region},
        )
        for region in sorted(display)
    }
    return Catalog(gpus=gpus, regions=regions, sources={key: path for key, (_, path) in presets.items()})


def _files(dirs: Sequence[Path]) -> Iterable[Path]:
    for d in dirs:
        if not d.is_dir():
            raise PresetError("not a directory of preset files", path=d)
        yield from sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def _check_gpu(preset: Preset, gpus: Mapping[str, GpuType], path: Path) -> None:
    gpu = gpus.get(preset.gpu_type)
    if gpu is None:
        known = ", ".join(sorted(gpus)) or "(none)"
        message, field = f"unknown GPU type {preset.gpu_type!r}; known: {known}", "gpu_type"
    elif preset.gpus_per_node > gpu.max_per_node:
        message = f"{preset.gpus_per_node} GPUs per node, but a {gpu.name} node holds at most {gpu.max_per_node}"
        field = "gpus"
    else:
        return
    raise PresetError(message, path=path, region=preset.region, preset=preset.name, field=field)


class _Loader(yaml.SafeLoader):
    # a key given twice in one mapping is a typo PyYAML would hide by keeping the last; merge keys (<<) may repeat
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} given twice", key_node.start_mark
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _parse(path: Path) -> _File:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PresetError(f"cannot read: {exc}", path=path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PresetError("the top level must be a mapping (gpus:, regions:)", path=path)
    raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
    return _validate(_File, raw, {}, path=path)


def _validate(
    model: type[_M],
    body: object,
    keys: Mapping[str, str],
    *,
    path: Path,
    region: str | None = None,
    preset: str | None = None,
) -> _M:
    # keys: fields that come from mapping keys (a preset's region and name), never from the body
    if keys:
        if not isinstance(body, dict):
            raise PresetError("must be a mapping", path=path, region=region, preset=preset, field="-")
        for field in keys:
            if field in body:
                message = f"{field!r} comes from the mapping key; do not set it"
                raise PresetError(message, path=path, region=region, preset=preset, field=field)
        body = {**body, **keys}
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        _raise_from(exc, path=path, region=region, preset=preset)


def _raise_from(exc: ValidationError, *, path: Path, region: str | None, preset: str | None) -> NoReturn:
    problems: list[tuple[str, str]] = []
    # an unknown field first: a typo also makes the field it misspells look missing
    for err in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        loc = [str(part) for part in err["loc"]]
        if preset is None and region is not None and loc[:1] == ["presets"] and len(loc) > 1:
            preset, loc = loc[1], loc[2:]  # a preset's bad name, caught while reading its region
            loc = ["name"] if loc == ["[key]"] else loc
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _FieldProblem):
            loc.append(cause.field)
            message = cause.detail
        elif err["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = err["msg"]
        problems.append((".".join(loc) or "-", message))
    (field, message), rest = problems[0], problems[1:]
    if rest:
        message += f" (and {len(rest)} more: {', '.join(f for f, _ in rest)})"
    raise PresetError(message, path=path, region=region, preset=preset, field=field) from None
