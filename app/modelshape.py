"""What the memory math needs from a model: its shape, read from a Hugging Face ``config.json``.

Parameters (dense and mixture-of-experts layers, tied or separate embeddings, biases), attention and KV heads, the
context limit vLLM derives (rope scaling), the dtype and a checkpoint's own quantisation; the text model of a
multimodal wrapper. ``picker`` turns a shape into bytes per GPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .presets import Quantization

_DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}
_UNGATED = {"gpt2", "gpt_bigcode", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "mpt"}
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}  # their config classes default to tied embeddings
_QUANT_METHODS: dict[str, Quantization] = {
    "fp8": "fp8",
    "awq": "awq",
    "awq_marlin": "awq",
    "gptq": "gptq",
    "gptq_marlin": "gptq",
}


class ModelConfigError(ValueError):
    """A config.json the picker cannot read; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the memory math needs from a Hugging Face ``config.json`` (the text model of a multimodal wrapper)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int
    max_model_len: int  # max_position_embeddings stretched by rope scaling, as vLLM derives it
    dtype: str = "bfloat16"  # the checkpoint's torch_dtype
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # gate/up/down (SwiGLU, GeGLU) rather than up/down
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    num_experts: int = 0  # 0: dense
    moe_layers: int = 0  # how many layers are mixture-of-experts
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    quantization: Quantization | None = None  # the checkpoint's own quantization_config

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def layer_params(self, moe: bool) -> tuple[int, int]:
        """(linear weights, everything else: norms, biases, router) of one decoder layer."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        linear = 2 * h * q + 2 * h * kv
        other = 2 * h + ((q + 2 * kv) if self.attention_bias else 0)
        if moe:
            linear += self.num_experts * 3 * h * self.moe_intermediate_size
            other += h * self.num_experts
            if self.shared_expert_intermediate_size:
                linear += 3 * h * self.shared_expert_intermediate_size
                other += h  # the shared expert's gate
        else:
            linear += (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return linear, other

    @property
    def linear_params(self) -> int:
        dense = self.num_layers - self.moe_layers
        return self.moe_layers * self.layer_params(True)[0] + dense * self.layer_params(False)[0]

    @property
    def params(self) -> int:
        dense = self.num_layers - self.moe_layers
        layers = self.moe_layers * sum(self.layer_params(True)) + dense * sum(self.layer_params(False))
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.embedding_params + layers + self.hidden_size + head

    def kv_cache_bytes_per_token(self, kv_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes


def load_model_shape(path: Path) -> ModelShape:
    """``path`` is a model directory or its ``config.json``."""
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelConfigError(f"{file}: cannot read the model config: {exc}") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{file}: not a JSON object")
    return model_shape_from_config(config, source=str(file))


def model_shape_from_config(config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
    try:
        return _shape(config, source)
    except ModelConfigError:
        raise
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, KeyError) as exc:  # a field of another shape
        raise ModelConfigError(f"{source}: malformed model config ({type(exc).__name__}: {exc})") from None


def _shape(config: Mapping[str, Any], source: str) -> ModelShape:
    cfg = dict(config)
    for key in ("text_config", "llm_config", "language_config"):  # multimodal wrappers: the text model
        if isinstance(config.get(key), dict) and "num_hidden_layers" not in config:
            cfg = {**config[key], **{k: config[k] for k in ("torch_dtype", "quantization_config") if k in config}}
            break
    if cfg.get("kv_lora_rank") is not None:
        raise ModelConfigError(f"{source}: MLA attention (kv_lora_rank, DeepSeek) is not modelled by the picker")

    def num(*keys: str, default: int | None = None) -> int:
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                if value < 0 or value == 0 and default is None:
                    raise ModelConfigError(f"{source}: {key} is {value}; it must be positive")
                return value
        if default is None:
            raise ModelConfigError(f"{source}: needs an integer {' or '.join(keys)}")
        return default

    model_type = str(cfg.get("model_type", ""))
    hidden, layers, heads = (
        num("hidden_size", "n_embd"),
        num("num_hidden_layers", "n_layer"),
        num("num_attention_heads"),
    )
    experts = num("num_local_experts", "num_experts", "n_routed_experts", default=0)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BITS:
        raise ModelConfigError(f"{source}: torch_dtype {dtype!r} is not one of {', '.join(_DTYPE_BITS)}")
    max_pos = num("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    kv_heads, head_dim = num("num_key_value_heads", default=heads), num("head_dim", default=hidden // heads)
    if kv_heads < 1 or head_dim < 1:
        raise ModelConfigError(f"{source}: num_key_value_heads and head_dim must be positive")
    return ModelShape(
        model_type=model_type,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=num("vocab_size"),
        intermediate_size=num("intermediate_size", "n_inner", default=4 * hidden),
        max_position_embeddings=max_pos,
        max_model_len=_derived_max_len(cfg, max_pos),
        dtype=dtype,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
        gated_mlp=model_type not in _UNGATED,
        attention_bias=bool(cfg.get("attention_bias", model_type.startswith("qwen2"))),
        num_experts=experts,
        moe_layers=_moe_layers(cfg, layers) if experts else 0,
        moe_intermediate_size=num("moe_intermediate_size", "intermediate_size", default=0),
        shared_expert_intermediate_size=num("shared_expert_intermediate_size", default=0) if experts else 0,
        quantization=_checkpoint_quantization(cfg.get("quantization_config")),
    )


def dtype_bits(dtype: str) -> int:
    return _DTYPE_BITS[dtype]


def _moe_layers(cfg: Mapping[str, Any], layers: int) -> int:
    step = cfg.get("decoder_sparse_step") or 1
    dense = set(cfg.get("mlp_only_layers") or ()) | set(range(cfg.get("first_k_dense_replace") or 0))
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def _derived_max_len(cfg: Mapping[str, Any], max_pos: int) -> int:
    # vLLM stretches the limit by the rope scaling factor, except for rope types that already encode it
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if not isinstance(factor, int | float) or kind in (None, "default", "su", "longrope", "llama3", "mrope"):
        return max_pos
    base = rope.get("original_max_position_embeddings", max_pos) if kind == "yarn" else max_pos
    return int(base * factor)


def _checkpoint_quantization(qc: object) -> Quantization | None:
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", ""))
    if method == "compressed-tensors":  # bits of the first weight scheme: 8 → fp8/int8, 4 → like gptq
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("num_bits") == 8:
                return "fp8" if weights.get("type") == "float" else "int8"
            if weights.get("num_bits") == 4:
                return "gptq"
        return None
    return _QUANT_METHODS.get(method)
