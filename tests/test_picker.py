"""The memory-math picker, checked against figures worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.modelshape import model_shape_from_config
from app.picker import GiB, check_model_fits_parallelism, evaluate, pick
from app.presets import Catalog, PresetError, builtin_presets_dir, load_catalog

from .model_configs import LLAMA_31_8B, LLAMA_31_70B, QWEN25_7B

H100 = 85_017_493_504
H200 = 150_109_880_320
H100_BUDGET = H100 * 9 // 10  # gpu_memory_utilization 0.90
H100_RESERVE = 2 * GiB + H100_BUDGET // 20


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog([builtin_presets_dir()])


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
