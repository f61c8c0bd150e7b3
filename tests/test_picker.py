"""The memory-math picker, checked against published parameter counts and figures worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.picker import (
    GiB,
    ModelConfigError,
    check_model_fits_parallelism,
    evaluate,
    load_model_shape,
    model_shape_from_config,
    pick,
)
from app.presets import Catalog, PresetError, builtin_presets_dir, load_catalog

# config.json of the real checkpoints (the fields that matter, as published on the Hugging Face Hub)
LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
LLAMA_31_70B: dict[str, Any] = {
    **LLAMA_31_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}
QWEN25_72B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "max_position_embeddings": 32768,
    "max_window_layers": 70,
    "model_type": "qwen2",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN25_7B: dict[str, Any] = {
    **QWEN25_72B,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
}
QWEN15_MOE_A27B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "decoder_sparse_step": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "shared_expert_intermediate_size": 5632,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 151936,
}

H100 = 85_017_493_504
H200 = 150_109_880_320
H100_BUDGET = H100 * 9 // 10  # gpu_memory_utilization 0.90
H100_RESERVE = 2 * GiB + H100_BUDGET // 20


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog([builtin_presets_dir()])


@pytest.mark.parametrize(
    ("config", "published", "exact"),
    [
        (LLAMA_31_8B, 8.03e9, 8_030_261_248),
        (LLAMA_31_70B, 70.6e9, 70_553_706_496),
        (MIXTRAL_8X7B, 46.7e9, 46_702_792_704),
        (QWEN25_72B, 72.7e9, 72_706_203_648),
        (QWEN25_7B, 7.61e9, 7_615_616_512),
        (QWEN15_MOE_A27B, 14.3e9, 14_315_784_192),
    ],
    ids=["llama-3.1-8b", "llama-3.1-70b", "mixtral-8x7b", "qwen2.5-72b", "qwen2.5-7b", "qwen1.5-moe-a2.7b"],
)
def test_parameter_count_matches_published(config: dict[str, Any], published: float, exact: int) -> None:
    params = model_shape_from_config(config).params
    assert abs(params - published) / published < 0.01
    assert params == exact  # the checkpoints' own safetensors totals


@pytest.mark.parametrize(
    ("config", "kv_bytes"),
    [
        (LLAMA_31_8B, 2 * 32 * 8 * 128 * 2),  # 131,072
        (LLAMA_31_70B, 2 * 80 * 8 * 128 * 2),  # 327,680
        (MIXTRAL_8X7B, 2 * 32 * 8 * 128 * 2),
        (QWEN25_72B, 2 * 80 * 8 * 128 * 2),
    ],
)
def test_kv_cache_bytes_per_token(config: dict[str, Any], kv_bytes: int) -> None:
    assert model_shape_from_config(config).kv_cache_bytes_per_token() == kv_bytes


def test_llama_8b_kv_per_token_is_128_kib() -> None:
    assert model_shape_from_config(LLAMA_31_8B).kv_cache_bytes_per_token() == 131_072


def test_shape_reads_moe_and_bias_fields() -> None:
    mixtral = model_shape_from_config(MIXTRAL_8X7B)
    assert (mixtral.num_experts, mixtral.moe_layers, mixtral.moe_intermediate_size) == (8, 32, 14336)
    qwen = model_shape_from_config(QWEN25_72B)
    assert qwen.attention_bias and not qwen.tie_word_embeddings and qwen.num_experts == 0


def test_max_model_len_follows_rope_scaling() -> None:
    assert model_shape_from_config(LLAMA_31_8B).max_model_len == 131072  # llama3 rope: already in max_position
    yarn = {**QWEN25_72B, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert model_shape_from_config(yarn).max_model_len == 131072


def test_text_config_of_a_multimodal_wrapper() -> None:
    text = {k: v for k, v in LLAMA_31_8B.items() if k != "torch_dtype"}
    wrapper = {
        "model_type": "llava",
        "text_config": text,
        "vision_config": {"hidden_size": 1024},
        "torch_dtype": "float16",
    }
    shape = model_shape_from_config(wrapper)
    assert shape.params == 8_030_261_248
    assert shape.dtype == "float16"


def test_load_model_shape_from_dir_or_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    assert load_model_shape(tmp_path) == load_model_shape(tmp_path / "config.json")
    assert load_model_shape(tmp_path).num_kv_heads == 8


def test_bad_model_config_names_file_and_key(tmp_path: Path) -> None:
    bad = {k: v for k, v in LLAMA_31_8B.items() if k != "vocab_size"}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ModelConfigError, match="vocab_size") as err:
        load_model_shape(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_shape(tmp_path / "missing")
    with pytest.raises(ModelConfigError, match="MLA"):
        model_shape_from_config({**LLAMA_31_8B, "kv_lora_rank": 512})


def test_checkpoint_quantization_is_read(catalog: Catalog) -> None:
    awq = model_shape_from_config({**LLAMA_31_8B, "quantization_config": {"quant_method": "awq", "bits": 4}})
    assert awq.quantization == "awq"
    c = evaluate(catalog, awq, catalog.get("fr", "h100-1x"), context=8192, concurrency=1)
    shape = model_shape_from_config(LLAMA_31_8B)
    linear = shape.linear_params
    other = shape.params - linear
    # 4.25 bits for the decoder's linear weights; embeddings, lm_head and norms stay at 16 bits
    assert c.weights_bytes_per_gpu == -(-(linear * 17 // 4 + other * 16) // 8)
    assert c.quantization == "awq"


def test_full_pick_llama_8b_on_one_h100(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_8B)
    result = pick(catalog, shape, "fr", "h100", context=8192, concurrency=32)
    assert result.preset is not None and result.preset.name == "h100-1x"
    c = result.chosen
    assert c is not None and c.fits
    weights = 8_030_261_248 * 2  # bf16, no split
    assert c.weights_bytes_per_gpu == weights == 16_060_522_496
    assert c.budget_bytes_per_gpu == H100_BUDGET == 76_515_744_153
    assert c.reserve_bytes_per_gpu == H100_RESERVE == 5_973_270_855
    free = H100_BUDGET - weights - H100_RESERVE  # 54,481,950,802
    assert c.kv_cache_bytes_per_token == c.kv_cache_bytes_per_token_per_gpu == 131_072
    assert c.kv_capacity_tokens == free // (131_072 * 16) * 16 == 415_664
    assert c.max_concurrency == 415_664 // 8192 == 50
    assert c.limited_by == "kv_cache"
    assert result.suggestions == ()
    assert [x.preset.name for x in result.candidates] == ["h100-1x", "h100-2x", "h100-4x", "h100-8x", "h100-16x"]


def test_tensor_and_pipeline_parallel_split(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_8B)
    two = evaluate(catalog, shape, catalog.get("fr", "h100-2x"), context=8192, concurrency=32)
    assert two.weights_bytes_per_gpu == 16_060_522_496 // 2
    assert two.kv_cache_bytes_per_token_per_gpu == 2 * 32 * 4 * 128 * 2
    sixteen = evaluate(catalog, shape, catalog.get("fr", "h100-16x"), context=8192, concurrency=32)
    # PP 2: 16 layers a stage; the heavier stage is the last (lm_head + final norm); TP 8 splits it
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336 + 2 * 4096
    assert sixteen.weights_bytes_per_gpu == -(-(16 * layer + 128256 * 4096 + 4096) * 2 // 8)
    assert sixteen.kv_cache_bytes_per_token_per_gpu == 2 * 16 * 1 * 128 * 2
    assert sixteen.limited_by == "max_num_seqs" and sixteen.max_concurrency == 512


def test_kv_heads_replicate_when_tp_exceeds_them(catalog: Catalog, tmp_path: Path) -> None:
    (tmp_path / "wide.yaml").write_text(
        "regions:\n  fr:\n    presets:\n      h100-16x-tp16:\n"
        "        {gpu_type: h100, gpus: 16, nodes: 2, tensor_parallel_size: 16, gpu_memory_utilization: 0.9,\n"
        "         max_model_len: 8192, max_num_seqs: 64, caps: {max_tokens_cap: 1024, default_max_tokens: 256}}\n"
    )
    wide = load_catalog([builtin_presets_dir(), tmp_path])
    shape = model_shape_from_config(LLAMA_31_8B)
    c = evaluate(wide, shape, wide.get("fr", "h100-16x-tp16"), context=1024, concurrency=1)
    assert c.kv_cache_bytes_per_token_per_gpu == 2 * 32 * 1 * 128 * 2  # 8 KV heads over 16 GPUs: one each


def test_llama_70b_needs_four_h100s(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_70B)
    result = pick(catalog, shape, "fr", "h100", context=8192, concurrency=32)
    assert result.preset is not None and result.preset.name == "h100-4x"
    by_name = {c.preset.name: c for c in result.candidates}
    two = by_name["h100-2x"]
    assert two.weights_bytes_per_gpu == 70_553_706_496  # 141.1 GB of bf16 over 2 GPUs
    assert two.weights_bytes_per_gpu + two.reserve_bytes_per_gpu > two.budget_bytes_per_gpu
    assert any("exceed the budget" in r for r in two.reasons)
    four = by_name["h100-4x"]
    assert four.weights_bytes_per_gpu == 70_553_706_496 // 2
    assert four.kv_cache_bytes_per_token_per_gpu == 2 * 80 * 2 * 128 * 2
    free = H100_BUDGET - 70_553_706_496 // 2 - H100_RESERVE
    assert four.kv_capacity_tokens == free // (81_920 * 16) * 16 == 430_480
    assert four.max_concurrency == 430_480 // 8192 == 52


def test_llama_70b_fits_two_h200s_when_any_gpu_will_do(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_70B)
    result = pick(catalog, shape, "fr", context=8192, concurrency=32)
    assert result.preset is not None and result.preset.key == "fr/h200-2x"
    c = result.chosen
    assert c is not None
    budget = H200 * 9 // 10
    free = budget - 70_553_706_496 - (2 * GiB + budget // 20)
    assert c.kv_capacity_tokens == free // (163_840 * 16) * 16 == 339_616


def test_context_above_max_model_len_disqualifies(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_8B)
    result = pick(catalog, shape, "fr", "h100", context=65536, concurrency=1)
    assert result.preset is not None and result.preset.name == "h100-2x"
    assert result.candidates[0].reasons == ("context 65536 is above max_model_len 32768",)


def test_heads_not_divisible_by_tp(catalog: Catalog) -> None:
    shape = model_shape_from_config(QWEN25_7B)  # 28 heads, 4 KV heads
    check_model_fits_parallelism(shape, catalog.get("fr", "h100-4x"))
    with pytest.raises(PresetError) as err:
        check_model_fits_parallelism(shape, catalog.get("fr", "h100-8x"))
    assert err.value.field == "tensor_parallel_size"
    assert "h100-8x" in str(err.value) and "tensor_parallel_size" in str(err.value)
    c = evaluate(catalog, shape, catalog.get("fr", "h100-8x"), context=1024, concurrency=1)
    assert not c.fits and not c.starts and "28 attention heads" in c.reasons[0]


def test_nothing_fits_suggests_shorter_context_and_lower_concurrency(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_70B)
    result = pick(catalog, shape, "uae", "h100", context=131072, concurrency=64)
    assert result.preset is None and result.chosen is None
    largest = result.reported
    assert largest is not None and largest.preset.name == "h100-8x"
    free = H100_BUDGET - 70_553_706_496 * 2 // 8 - H100_RESERVE
    assert largest.kv_capacity_tokens == free // (40_960 * 16) * 16 == 1_291_600
    assert result.suggestions == (
        "a shorter context: up to 20176 tokens at concurrency 64 fits on uae/h100-8x",  # 1,291,600 // 64, in blocks
        "lower concurrency: up to 9 requests of 131072 tokens fit on uae/h100-8x",  # 1,291,600 // 131,072
    )


def test_nothing_fits_suggests_fp8_and_other_regions(tmp_path: Path) -> None:
    (tmp_path / "small.yaml").write_text(
        "regions:\n  small:\n    display_name: Small\n    presets:\n      h100-2x:\n"
        "        {gpu_type: h100, gpus: 2, tensor_parallel_size: 2, gpu_memory_utilization: 0.9,\n"
        "         max_model_len: 32768, max_num_seqs: 64, caps: {max_tokens_cap: 4096, default_max_tokens: 256}}\n"
    )
    cat = load_catalog([builtin_presets_dir(), tmp_path])
    shape = model_shape_from_config(LLAMA_31_70B)
    result = pick(cat, shape, "small", context=4096, concurrency=8)
    assert result.preset is None
    assert result.suggestions[0].startswith("fp8 quantisation (--quantization fp8) fits on small/h100-2x")
    assert any(s.startswith("region fr (--region fr) fits on fr/h200-2x") for s in result.suggestions)
    assert any(s.startswith("region uae (--region uae) fits on uae/h200-2x") for s in result.suggestions)

    fp8 = pick(cat, shape, "small", context=4096, concurrency=8, quantization="fp8")
    c = fp8.chosen
    assert c is not None and c.quantization == "fp8"
    other = 2 * 128256 * 8192 + 80 * 2 * 8192 + 8192  # embeddings, lm_head, norms stay bf16
    assert c.weights_bytes_per_gpu == -(-((70_553_706_496 - other) * 1 + other * 2) // 2)


def test_other_gpu_type_is_suggested(catalog: Catalog) -> None:
    shape = model_shape_from_config(QWEN25_7B)  # 28 heads: TP 8 is out, so h100-4x is the largest H100 option
    result = pick(catalog, shape, "fr", "h100", context=131072, concurrency=40)
    assert result.preset is None
    by_name = {c.preset.name: c for c in result.candidates}
    assert by_name["h100-4x"].max_concurrency == 35 and by_name["h100-4x"].starts
    assert not by_name["h100-8x"].starts and not by_name["h100-16x"].starts
    assert any(s.startswith("GPU h200 (--gpu h200) fits on fr/h200-4x: ") for s in result.suggestions)


def test_unknown_region_and_bad_request(catalog: Catalog) -> None:
    shape = model_shape_from_config(LLAMA_31_8B)
    with pytest.raises(LookupError, match="regions: fr, uae"):
        pick(catalog, shape, "de", context=1024, concurrency=1)
    with pytest.raises(ValueError, match="at least 1"):
        pick(catalog, shape, "fr", context=0, concurrency=1)
