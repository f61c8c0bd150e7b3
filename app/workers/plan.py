"""From (preset, model, the machine's GPUs) to the exact worker processes to run.

On a machine with G GPUs and a preset of N GPUs per worker, G // N workers each get their own
``CUDA_VISIBLE_DEVICES`` slice, the preset's parallelism and engine limits, a free loopback port and an internal
API key (passed in the environment, never on the command line).  A preset spanning several nodes is not
launched from here: ``multinode_commands`` prints what to run on a Ray cluster instead.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..presets import Preset
from .launch import EngineArgs, cpu_worker_spec, free_port, gpu_worker_spec, supports_explicit_abort, vllm_version
from .supervisor import WorkerSpec

CPU_PRESET = "cpu"


class PlanError(ValueError):
    """The preset cannot run on this machine as asked."""


def detect_gpus() -> list[int]:
    """GPU indices visible to us: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [x.strip() for x in visible.split(",") if x.strip()]
        if entries and not all(x.isdigit() or x == "-1" for x in entries):
            raise PlanError(f"CUDA_VISIBLE_DEVICES={visible[:80]} names GPUs by UUID (or MIG instance): workers are "
                            "given GPU slices by index; pass --gpus 0,1,... (nvidia-smi's indices) instead")
        return [int(x) for x in entries if x.isdigit()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    path: str
    served_name: str
    max_model_len: int | None = None  # None: the preset's
    extra_args: tuple[str, ...] = ()


def engine_args(preset: Preset, model: ModelSpec) -> EngineArgs:
    # int8 names a W8A8 checkpoint (vLLM reads its scheme from the checkpoint): not a --quantization value
    quant = preset.quantization if preset.quantization in ("fp8", "awq", "gptq") else None
    extra = list(model.extra_args)
    if preset.kv_cache_dtype and preset.kv_cache_dtype != "auto":
        extra = ["--kv-cache-dtype", preset.kv_cache_dtype, *extra]
    return EngineArgs(
        model=model.path,
        served_model_name=model.served_name,
        max_model_len=model.max_model_len or preset.max_model_len,
        tensor_parallel_size=preset.tensor_parallel_size,
        pipeline_parallel_size=preset.pipeline_parallel_size,
        gpu_memory_utilization=preset.gpu_memory_utilization,
        max_num_seqs=preset.max_num_seqs,
        dtype=preset.dtype if preset.dtype and preset.dtype != "auto" else None,
        quantization=quant,
        extra_args=tuple(extra),
        explicit_abort=supports_explicit_abort(vllm_version()),
    )


def plan_gpu_workers(preset: Preset, model: ModelSpec, gpus: Sequence[int], *, log_dir: Path,
                     port: Callable[[], int] = free_port, extra_env: dict[str, str] | None = None
                     ) -> list[WorkerSpec]:
    if preset.nodes > 1:
        raise PlanError(
            f"preset {preset.key} spans {preset.nodes} nodes: run it on a Ray cluster "
            f"(see `tokengate serve --dry-run` for the commands) and point the gateway at it with --upstream"
        )
    per = preset.gpus
    if len(set(gpus)) != len(gpus):
        raise PlanError(f"GPU list has duplicates: {list(gpus)}")
    if len(gpus) < per:
        found = ",".join(map(str, gpus)) or "none"
        raise PlanError(f"preset {preset.key} needs {per} GPU(s) per worker; this machine has {found}")
    args = engine_args(preset, model)
    env = {**(extra_env or {})}
    if per > 1:
        # NVLink multicast off: it hangs NCCL on some drivers/fabrics; vLLM falls back to PyNCCL all-reduce
        env.setdefault("NCCL_NVLS_ENABLE", "0")
    specs = []
    for i in range(len(gpus) // per):
        slice_ = list(gpus[i * per:(i + 1) * per])
        specs.append(gpu_worker_spec(args, name=f"{preset.region}-{preset.name}-{i}", region=preset.region,
                                     preset=preset.name, log_dir=log_dir, gpus=slice_, port=port(),
                                     extra_env=env))
    return specs


def plan_cpu_workers(model: ModelSpec, *, region: str, replicas: int, log_dir: Path,
                     port: Callable[[], int] = free_port, extra_env: dict[str, str] | None = None
                     ) -> list[WorkerSpec]:
    args = EngineArgs(model=model.path, served_model_name=model.served_name,
                      max_model_len=model.max_model_len or 2048, extra_args=model.extra_args,
                      explicit_abort=supports_explicit_abort(vllm_version()))
    return [
        cpu_worker_spec(args, name=f"{region}-{CPU_PRESET}-{i}", region=region, preset=CPU_PRESET,
                        log_dir=log_dir, port=port(), extra_env=extra_env)
        for i in range(replicas)
    ]


def multinode_commands(preset: Preset, model: ModelSpec, *, port: int = 8000) -> str:
    """What to run for a preset bigger than one host: a Ray cluster with one node per ``gpus_per_node`` GPUs,
    tensor parallel inside each node, pipeline parallel across them."""
    args = engine_args(preset, model)
    argv = [
        "python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", args.model, "--served-model-name", args.served_model_name,
        "--host", "0.0.0.0", "--port", str(port),
        "--max-model-len", str(args.max_model_len),
        "--tensor-parallel-size", str(preset.tensor_parallel_size),
        "--pipeline-parallel-size", str(preset.pipeline_parallel_size),
        "--distributed-executor-backend", "ray",
        "--gpu-memory-utilization", f"{preset.gpu_memory_utilization:g}",
        "--max-num-seqs", str(preset.max_num_seqs),
        *(["--dtype", args.dtype] if args.dtype else []),
        *(["--quantization", args.quantization] if args.quantization else []),
        *args.extra_args,
    ]
    tp, pp = preset.tensor_parallel_size, preset.pipeline_parallel_size
    layout = (f"TP {tp} inside a node, PP {pp} across nodes" if tp <= preset.gpus_per_node else
              f"TP {tp} across nodes - its all-reduce crosses the network on every layer - and PP {pp}")
    lines = [
        f"# preset {preset.key}: {preset.nodes} nodes x {preset.gpus_per_node} {preset.gpu_type} GPUs ({layout})",
        "# 1. on the head node:",
        f"ray start --head --port=6379 --num-gpus={preset.gpus_per_node}",
    ]
    for n in range(1, preset.nodes):
        lines.append(f"# {n + 1}. on worker node {n}:")
        lines.append(f"ray start --address=HEAD_IP:6379 --num-gpus={preset.gpus_per_node}")
    lines += [
        f"# {preset.nodes + 1}. on the head node, with VLLM_API_KEY set to the workers' internal key:",
        shlex.join(argv),
        "# then point the gateway at it:",
        f"tokengate serve --upstream {preset.region}/{preset.name}=http://HEAD_IP:{port} --upstream-api-key ...",
    ]
    return "\n".join(lines)


def describe(specs: Sequence[WorkerSpec]) -> str:
    """The dry-run listing: each worker's environment and exact command line."""
    out = []
    for spec in specs:
        out.append(f"# worker {spec.name} (region {spec.region}, preset {spec.preset}) -> {spec.url}, "
                   f"log {spec.log_path}")
        for key in sorted(spec.env):
            value = "<internal key, generated at start>" if key == "VLLM_API_KEY" else spec.env[key]
            out.append(f"{key}={shlex.quote(value)}")
        out.append(shlex.join(spec.argv))
        out.append("")
    return "\n".join(out)
