"""The memory-math picker: which preset holds a model, a context length and a concurrency.

Per GPU, against its budget ``memory_bytes × gpu_memory_utilization`` (vLLM's own budget):

* weights: parameters counted from ``config.json`` × bits per parameter, split over TP; the pipeline stage with the
  most layers (plus the embedding or the lm_head) sets the figure. Quantised runs (fp8/int8 = 8 bits, awq/gptq =
  4.25 bits: 4-bit weights + a 16-bit scale and a 4-bit zero per group of 128, rounded up) quantise the decoder's
  linear layers; embeddings, lm_head, norms and biases stay at the activation dtype, as in vLLM.
* reserve: ``RESERVE_FIXED_BYTES + RESERVE_FRACTION × budget``, for the CUDA context, NCCL buffers, the activation peak
  of vLLM's profiling run and CUDA graphs.
* KV cache: what is left, in 16-token blocks. Per token a GPU holds ``2 (K and V) × its layers × its KV heads ×
  head_dim × KV bytes``; its KV heads are ``kv_heads / TP``, at least 1 (replicated when TP > kv_heads).

A preset fits when: the heads divide over TP; the context is within the preset's ``max_model_len`` (a hard limit: a
preset does not stretch) and the model's own limit; the KV cache holds one ``max_model_len`` sequence (vLLM refuses
to start otherwise); and ``concurrency`` sequences of ``context`` tokens fit, within ``max_num_seqs``.
The pick is the smallest that fits: fewest GPUs, then the GPU with less memory.

Not modelled: vision towers of multimodal models (text model only), MLA attention (DeepSeek), sliding-window savings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

from .modelshape import ModelShape, dtype_bits
from .presets import Catalog, Dtype, Preset, PresetError, Quantization

GiB = 1 << 30
BLOCK_TOKENS = 16  # vLLM's default KV block size
RESERVE_FIXED_BYTES = 2 * GiB
RESERVE_FRACTION = Fraction(1, 20)
RESERVE_FORMULA = "reserve per GPU = 2 GiB + 5% of budget; budget = GPU memory * gpu_memory_utilization"
QUANT_BITS: dict[str, Fraction] = {
    "fp8": Fraction(8),
    "int8": Fraction(8),
    "awq": Fraction(17, 4),
    "gptq": Fraction(17, 4),
}

Limit = Literal["kv_cache", "max_num_seqs"]
@dataclass(frozen=True, slots=True)
class Candidate:
    """The memory math for one preset; byte figures are per GPU unless named otherwise."""

    preset: Preset
    dtype: str  # activation / unquantised weight dtype
    quantization: str | None
    weights_bytes_per_gpu: int
    kv_cache_bytes_per_token: int  # the whole model, before any split
    kv_cache_bytes_per_token_per_gpu: int
    budget_bytes_per_gpu: int
    reserve_bytes_per_gpu: int
    kv_capacity_tokens: int
    max_concurrency: int  # at the requested context
    limited_by: Limit
    max_model_len: int  # the preset's, clamped to the model's own limit
    starts: bool  # a worker would start: heads divide, weights fit, KV holds one max_model_len
    reasons: tuple[str, ...]  # why it does not fit; empty when it does

    @property
    def fits(self) -> bool:
        return not self.reasons


@dataclass(frozen=True, slots=True)
class PickResult:
    region: str
    context: int
    concurrency: int
    preset: Preset | None  # None: nothing fits
    candidates: tuple[Candidate, ...]
    suggestions: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.preset == self.preset), None)

    @property
    def reported(self) -> Candidate | None:
        """The pick, or when nothing fits the largest candidate (most GPUs, then most memory)."""
        return self.chosen or (self.candidates[-1] if self.candidates else None)


def check_model_fits_parallelism(shape: ModelShape, preset: Preset, path: Path | None = None) -> None:
    """Raise ``PresetError`` (naming the preset's file when given, the preset and the field) when the model's heads
    or layers cannot split this way."""
    problem = _parallelism_problem(shape, preset)
    if problem is not None:
        field_name, message = problem
        raise PresetError(message, path=path, region=preset.region, preset=preset.name, field=field_name)


def evaluate(
    catalog: Catalog,
    shape: ModelShape,
    preset: Preset,
    *,
    context: int,
    concurrency: int,
    dtype: Dtype | None = None,
    quantization: Quantization | None = None,
) -> Candidate:
    tp, pp = preset.tensor_parallel_size, preset.pipeline_parallel_size
    act_dtype = _resolve_dtype(dtype or preset.dtype, shape)
    quant = quantization or preset.quantization or shape.quantization
    act_bits = dtype_bits(act_dtype)
    weights = _weights_per_gpu(shape, tp, pp, act_bits, QUANT_BITS[quant] if quant else Fraction(act_bits))
    kv_bytes = 1 if preset.kv_cache_dtype == "fp8" else act_bits // 8
    kv_total = shape.kv_cache_bytes_per_token(kv_bytes)
    kv_gpu = 2 * _ceil_div(shape.num_layers, pp) * max(1, shape.num_kv_heads // tp) * shape.head_dim * kv_bytes
    budget = int(catalog.gpu(preset).memory_bytes * Fraction(str(preset.gpu_memory_utilization)))
    reserve = RESERVE_FIXED_BYTES + int(budget * RESERVE_FRACTION)
    free = budget - weights - reserve
    capacity = max(0, free) // (kv_gpu * BLOCK_TOKENS) * BLOCK_TOKENS
    by_kv = capacity // _round_up(context, BLOCK_TOKENS)
    max_conc = min(by_kv, preset.max_num_seqs)
    limited_by: Limit = "kv_cache" if by_kv <= preset.max_num_seqs else "max_num_seqs"
    max_len = min(preset.max_model_len, shape.max_model_len)

    reasons: list[str] = []
    if (problem := _parallelism_problem(shape, preset)) is not None:
        reasons.append(problem[1])
    starts = problem is None and free > 0 and capacity >= max_len
    if context > shape.max_model_len:
        reasons.append(f"context {context} is above the model's limit {shape.max_model_len}")
    elif context > preset.max_model_len:
        reasons.append(f"context {context} is above max_model_len {preset.max_model_len}")
    if free <= 0:
        reasons.append(f"weights {_gib(weights)} + reserve {_gib(reserve)} exceed the budget {_gib(budget)} per GPU")
    elif capacity < max_len:
        reasons.append(f"KV cache holds {capacity} tokens, under one max_model_len ({max_len}): vLLM will not start")
    if not reasons and max_conc < concurrency:
        if limited_by == "max_num_seqs":
            reasons.append(f"concurrency {concurrency} is above max_num_seqs {preset.max_num_seqs}")
        else:
            reasons.append(f"KV cache holds {capacity} tokens: {by_kv} sequences of {context}, not {concurrency}")
    return Candidate(
        preset=preset,
        dtype=act_dtype,
        quantization=quant,
        weights_bytes_per_gpu=weights,
        kv_cache_bytes_per_token=kv_total,
        kv_cache_bytes_per_token_per_gpu=kv_gpu,
        budget_bytes_per_gpu=budget,
        reserve_bytes_per_gpu=reserve,
        kv_capacity_tokens=capacity,
        max_concurrency=max_conc,
        limited_by=limited_by,
        max_model_len=max_len,
        starts=starts,
        reasons=tuple(reasons),
    )


def pick(
    catalog: Catalog,
    shape: ModelShape,
    region: str,
    gpu: str | None = None,
    *,
    context: int,
    concurrency: int,
    dtype: Dtype | None = None,
    quantization: Quantization | None = None,
) -> PickResult:
    """The smallest preset in ``region`` (of GPU type ``gpu`` when given) that fits; with suggestions when none does."""
    if context < 1 or concurrency < 1:
        raise ValueError("context and concurrency must be at least 1")
    result = _pick(catalog, shape, region, gpu, context, concurrency, dtype, quantization)
    if result.preset is None:
        result = replace(result, suggestions=_suggest(catalog, shape, result, gpu, dtype, quantization))
    return result


def _pick(
    catalog: Catalog,
    shape: ModelShape,
    region: str,
    gpu: str | None,
    context: int,
    concurrency: int,
    dtype: Dtype | None,
    quantization: Quantization | None,
) -> PickResult:
    presets = [p for p in catalog.presets(region) if gpu is None or p.gpu_type == gpu]
    candidates = tuple(
        evaluate(catalog, shape, p, context=context, concurrency=concurrency, dtype=dtype, quantization=quantization)
        for p in presets
    )
    chosen = next((c.preset for c in candidates if c.fits), None)
    return PickResult(region, context, concurrency, chosen, candidates)


def _suggest(
    catalog: Catalog,
    shape: ModelShape,
    failed: PickResult,
    gpu: str | None,
    dtype: Dtype | None,
    quantization: Quantization | None,
) -> tuple[str, ...]:
    region, context, concurrency = failed.region, failed.context, failed.concurrency
    out: list[str] = []
    if not failed.candidates:
        out.append(f"region {region} has no presets" + (f" of GPU type {gpu}" if gpu else ""))
    if quantization is None and all(c.quantization is None for c in failed.candidates):
        fp8 = _pick(catalog, shape, region, gpu, context, concurrency, dtype, "fp8")
        if (c := fp8.chosen) is not None:
            out.append(f"fp8 quantisation (--quantization fp8) fits on {c.preset.key}: {_summary(c)}")
    usable = [c for c in failed.candidates if c.starts and concurrency <= c.preset.max_num_seqs]
    best_ctx = max(usable, key=lambda c: _max_context(c, concurrency), default=None)
    if best_ctx is not None and 0 < (n := _max_context(best_ctx, concurrency)) < context:
        out.append(f"a shorter context: up to {n} tokens at concurrency {concurrency} fits on {best_ctx.preset.key}")
    at_ctx = [c for c in failed.candidates if c.starts and context <= c.max_model_len]
    best_conc = max(at_ctx, key=lambda c: c.max_concurrency, default=None)
    if best_conc is not None and 0 < best_conc.max_concurrency < concurrency:
        n = best_conc.max_concurrency
        out.append(f"lower concurrency: up to {n} requests of {context} tokens fit on {best_conc.preset.key}")
    if gpu is not None:
        for other in sorted({p.gpu_type for p in catalog.presets(region)} - {gpu}):
            alt = _pick(catalog, shape, region, other, context, concurrency, dtype, quantization)
            if (c := alt.chosen) is not None:
                out.append(f"GPU {other} (--gpu {other}) fits on {c.preset.key}: {_summary(c)}")
    for name in catalog.regions:
        if name == region:
            continue
        alt = _pick(catalog, shape, name, gpu, context, concurrency, dtype, quantization)
        if alt.chosen is None and gpu is not None:
            alt = _pick(catalog, shape, name, None, context, concurrency, dtype, quantization)
        if (c := alt.chosen) is not None:
            out.append(f"region {name} (--region {name}) fits on {c.preset.key}: {_summary(c)}")
    if not out:
        out.append(
            "no change of quantisation, context, concurrency, GPU or region fits; add a larger preset (--presets)"
        )
    return tuple(out)


def _max_context(c: Candidate, concurrency: int) -> int:
    return min(c.max_model_len, c.kv_capacity_tokens // concurrency // BLOCK_TOKENS * BLOCK_TOKENS)


def _summary(c: Candidate) -> str:
    return (
        f"weights {_gib(c.weights_bytes_per_gpu)}/GPU, KV capacity {c.kv_capacity_tokens} tokens, "
        f"max concurrency {c.max_concurrency}"
    )


def _parallelism_problem(shape: ModelShape, preset: Preset) -> tuple[str, str] | None:
    tp, pp = preset.tensor_parallel_size, preset.pipeline_parallel_size
    heads, kv = shape.num_attention_heads, shape.num_kv_heads
    if heads % tp:
        return "tensor_parallel_size", f"{heads} attention heads are not divisible by tensor_parallel_size {tp}"
    if (kv % tp) if kv >= tp else (tp % kv):
        return "tensor_parallel_size", f"{kv} KV heads are not divisible by tensor_parallel_size {tp} (nor it by them)"
    if pp > shape.num_layers:
        return "pipeline_parallel_size", f"{shape.num_layers} layers are fewer than pipeline_parallel_size {pp}"
    return None


def _resolve_dtype(dtype: str | None, shape: ModelShape) -> str:
    # vLLM's "auto": the checkpoint's dtype, except float32 checkpoints run in 16 bits
    if dtype in (None, "auto"):
        return "bfloat16" if shape.dtype == "float32" else shape.dtype
    return dtype


def _weights_per_gpu(shape: ModelShape, tp: int, pp: int, act_bits: int, linear_bits: Fraction) -> int:
    if pp == 1:
        linear = shape.linear_params
        other = shape.params - linear
    else:  # the heaviest stage: most layers, plus the embedding (first) or the lm_head and final norm (last)
        layers = _ceil_div(shape.num_layers, pp)
        moe = shape.moe_layers > 0
        linear, other = (layers * n for n in shape.layer_params(moe))
        other += max(shape.embedding_params, shape.vocab_size * shape.hidden_size + shape.hidden_size)
    bits = linear * linear_bits + other * act_bits
    return _ceil_div(math.ceil(bits), 8 * tp)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(n: int, k: int) -> int:
    return _ceil_div(n, k) * k


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
