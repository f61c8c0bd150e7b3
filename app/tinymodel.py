"""Build a tiny, deterministic Llama model with its own tokenizer and chat template.

The embedded default and the integration tests serve this model through a real vLLM engine: no hub, no
download, byte-identical on every run (seeded corpus, seeded weights).  ``transformers``/``torch`` are
imported lazily so the gateway alone never needs them.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

VOCAB_SIZE = 2048
SEED = 20261127
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
_SYLLABLES = ["ka", "to", "ri", "ne", "mo", "sa", "lu", "vi", "da", "pe", "zo", "qu", "th", "sh", "an", "el"]
_MARKER = ".tokengate-tiny"


def _corpus(rng: random.Random) -> list[str]:
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(2500)]
    words += ["hello", "world", "the", "a", "is", "gateway", "test", "model", "user", "assistant", "system"]
    words += [str(i) for i in range(100)]
    lines = []
    for _ in range(12000):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        lines.append(s.capitalize() + rng.choice([".", "!", "?", ",", ":"]))
    return lines


def build_tiny_model(out: str | os.PathLike[str]) -> Path:
    """Write the tiny model to ``out`` (idempotent: a complete model there is reused) and return its path."""
    path = Path(out)
    if (path / _MARKER).exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=_SPECIAL,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(rng), trainer)
    missing = VOCAB_SIZE - tok.get_vocab_size()
    if missing > 0:  # every id the model can emit must decode
        tok.add_tokens([f"<|x{i}|>" for i in range(missing)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tok.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id
    ).save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps({"seed": SEED, "vocab_size": VOCAB_SIZE}))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path
