"""Tiny Hugging Face decoders built from configs with fixed seeds, and PEFT adapters for them
with non-zero B, saved as a user would have them (``save_pretrained``): for the tests that need
a real base and adapter on disk without the PEFT-oracle machinery of ``tests/models/test_hf.py``."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB = 96
B_STD = 0.3  # LoRA B: large enough that the adapter moves every output
_SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=VOCAB,
    bos_token_id=1,
    eos_token_id=2,
)
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}


def build(name: str, seed: int = 0):
    """A tiny ``name`` causal LM in eval mode (Qwen2 with tied embeddings, as Qwen2 ships)."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=1, eos_token_id=2)  # fmt: skip
        return tf.GPT2LMHeadModel(config).eval()
    if name == "bert":
        config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128)  # fmt: skip
        return tf.BertModel(config).eval()
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**_SMALL, tie_word_embeddings=True)).eval()
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**_SMALL, sliding_window=None)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**_SMALL, pad_token_id=0)).eval()


def save_base_and_adapter(name: str, root: Path, seed: int = 1, scale: float = 1.0) -> tuple[Path, Path]:
    """``root/base`` and ``root/adapter`` (PEFT's format, r=4, alpha 8, B random × ``scale``)."""
    import peft

    base = build(name)
    base.save_pretrained(root / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[name], fan_in_fan_out=name == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD * scale)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"
