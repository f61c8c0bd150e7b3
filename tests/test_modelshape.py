"""Reading a model's shape from config.json, checked against published parameter counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.modelshape import ModelConfigError, load_model_shape, model_shape_from_config

from .model_configs import LLAMA_31_8B, LLAMA_31_70B, MIXTRAL_8X7B, QWEN15_MOE_A27B, QWEN25_7B, QWEN25_72B


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


@pytest.mark.parametrize("change", [
    {"num_attention_heads": 0}, {"num_key_value_heads": 0}, {"num_hidden_layers": 0}, {"hidden_size": -4096},
    {"rope_scaling": "yarn"},
    {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": 3}}},
    {"num_local_experts": 8, "mlp_only_layers": 5}, {"num_local_experts": 8, "first_k_dense_replace": "3"},
    {"head_dim": 0},
])
def test_a_malformed_config_is_a_config_error_not_a_crash(change: dict[str, Any]) -> None:
    """Valid JSON of the wrong shape: the picker and serve say which file is wrong (exit 2), never a traceback."""
    with pytest.raises(ModelConfigError, match="config.json"):
        model_shape_from_config({**LLAMA_31_8B, **change})
