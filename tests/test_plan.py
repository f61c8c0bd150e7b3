"""Managed-worker plans: the exact command lines and environment for each preset on an 8-GPU layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.presets import builtin_presets_dir, load_catalog
from app.workers.plan import ModelSpec, PlanError, multinode_commands, plan_cpu_workers, plan_gpu_workers

CATALOG = load_catalog([builtin_presets_dir()])
MODEL = ModelSpec(path="/models/llama-70b", served_name="llama")
EIGHT = list(range(8))


def ports() -> object:
    counter = iter(range(9100, 9200))
    return lambda: next(counter)


@pytest.mark.parametrize(("preset", "workers"), [("h100-1x", 8), ("h100-2x", 4), ("h100-4x", 2), ("h100-8x", 1)])
def test_eight_gpus_are_sliced_per_preset(preset: str, workers: int, tmp_path: Path) -> None:
    p = CATALOG.get("fr", preset)
    specs = plan_gpu_workers(p, MODEL, EIGHT, log_dir=tmp_path, port=ports())  # type: ignore[arg-type]
    assert len(specs) == workers
    per = 8 // workers
    seen: list[int] = []
    for i, spec in enumerate(specs):
        gpus = [int(g) for g in spec.env["CUDA_VISIBLE_DEVICES"].split(",")]
        assert gpus == list(range(i * per, (i + 1) * per))
        seen += gpus
        argv = list(spec.argv)
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == str(p.tensor_parallel_size) == str(per)
        assert argv[argv.index("--max-model-len") + 1] == str(p.max_model_len)
        assert argv[argv.index("--max-num-seqs") + 1] == str(p.max_num_seqs)
        assert argv[argv.index("--gpu-memory-utilization") + 1] == f"{p.gpu_memory_utilization:g}"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"  # never reachable from outside
        assert argv[argv.index("--port") + 1] == str(9100 + i)
        assert "--api-key" not in argv and spec.api_key not in " ".join(argv)
        assert spec.env["VLLM_API_KEY"] == spec.api_key and spec.api_key.startswith("tg-internal-")
        assert spec.name == f"fr-{preset}-{i}" and spec.region == "fr" and spec.preset == preset
        assert spec.log_path == tmp_path / f"{spec.name}.log"
        if per > 1:
            assert spec.env["NCCL_NVLS_ENABLE"] == "0"
    assert sorted(seen) == EIGHT
    assert len({s.api_key for s in specs}) == workers  # a key per worker


def test_not_enough_gpus(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="needs 4 GPU"):
        plan_gpu_workers(CATALOG.get("fr", "h100-4x"), MODEL, [0, 1], log_dir=tmp_path)


def test_leftover_gpus_stay_idle(tmp_path: Path) -> None:
    specs = plan_gpu_workers(CATALOG.get("fr", "h100-2x"), MODEL, [0, 1, 2], log_dir=tmp_path)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0,1"]


def test_quantisation_and_dtype_reach_the_command(tmp_path: Path) -> None:
    base = CATALOG.get("fr", "h100-1x")
    p = base.model_copy(update={"quantization": "fp8", "dtype": "bfloat16", "kv_cache_dtype": "fp8"})
    argv = list(plan_gpu_workers(p, MODEL, [0], log_dir=tmp_path)[0].argv)
    assert argv[argv.index("--quantization") + 1] == "fp8"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--kv-cache-dtype") + 1] == "fp8"
    int8 = base.model_copy(update={"quantization": "int8"})  # a W8A8 checkpoint: vLLM reads the scheme itself
    assert "--quantization" not in plan_gpu_workers(int8, MODEL, [0], log_dir=tmp_path)[0].argv


def test_multinode_preset_is_never_launched_locally(tmp_path: Path) -> None:
    p = CATALOG.get("fr", "h100-16x")
    with pytest.raises(PlanError, match="Ray cluster"):
        plan_gpu_workers(p, MODEL, list(range(16)), log_dir=tmp_path)
    text = multinode_commands(p, MODEL)
    assert "ray start --head" in text and "ray start --address=HEAD_IP:6379 --num-gpus=8" in text
    cmd = next(line for line in text.splitlines() if "vllm.entrypoints" in line)
    assert "--distributed-executor-backend ray" in cmd
    assert "--tensor-parallel-size 8" in cmd and "--pipeline-parallel-size 2" in cmd
    assert "(TP 8 inside a node, PP 2 across nodes)" in text
    wide = multinode_commands(p.model_copy(update={"tensor_parallel_size": 16, "pipeline_parallel_size": 1}), MODEL)
    assert "TP 16 across nodes" in wide and "inside a node" not in wide
    fp8 = multinode_commands(p.model_copy(update={"quantization": "fp8", "dtype": "float16"}), MODEL)
    cmd = next(line for line in fp8.splitlines() if "vllm.entrypoints" in line)
    assert "--quantization fp8" in cmd and "--dtype float16" in cmd  # as a one-node worker gets them


def test_cpu_workers(tmp_path: Path) -> None:
    specs = plan_cpu_workers(ModelSpec("/m", "tiny", 2048), region="local", replicas=2, log_dir=tmp_path)
    assert [s.name for s in specs] == ["local-cpu-0", "local-cpu-1"]
    for s in specs:
        argv = " ".join(s.argv)
        assert "--dtype float32 --enforce-eager" in argv and "--max-model-len 2048" in argv
        assert s.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and "CUDA_VISIBLE_DEVICES" not in s.env
        assert re.search(r"--port \d+", argv)
    assert specs[0].port != specs[1].port
