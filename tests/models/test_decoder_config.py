"""The one reader of a Llama / Mistral / Qwen2 configuration (``models.hf.decoder_config``): the
fused writer reads transformers' config, the layer-streamed reference the saved config.json, and
both must come to the same facts; RoPE's frequencies are transformers' own."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from loraexport.errors import ExportError  # noqa: E402
from loraexport.models.hf.decoder_config import check_fused, decoder_config  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SMALL |= dict(num_key_value_heads=2, max_position_embeddings=128, vocab_size=100)
CONFIGS = {
    "llama_gqa": (transformers.LlamaConfig, {"rope_theta": 500000.0}),
    "llama_biases_tied": (
        transformers.LlamaConfig,
        {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
    ),
    "mistral_window": (transformers.MistralConfig, {"sliding_window": 3}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen2_window": (
        transformers.Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
    ),
}


def _config(kind: str, **overrides):
    cls, kw = CONFIGS[kind]
    return cls(**{**SMALL, **kw, **overrides})


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformers_config_and_its_config_json_read_the_same(kind, tmp_path):
    config = _config(kind)
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert decoder_config(config) == decoder_config(raw)


def test_each_family_s_biases_windows_and_tied_head():
    qwen2, window = decoder_config(_config("qwen2")), decoder_config(_config("qwen2_window"))
    assert qwen2.biases == {"q_proj", "k_proj", "v_proj"} and qwen2.windows == (None, None)
    assert window.windows == (None, 3)  # sliding from layer max_window_layers on
    assert decoder_config(_config("mistral_window")).windows == (3, 3)
    llama = decoder_config(_config("llama_biases_tied"))
    assert llama.bias("model.layers.0.mlp.down_proj") and not llama.bias("lm_head")
    assert llama.head_name(False) == "model.embed_tokens.weight"
    assert llama.head_name(True) == "lm_head.weight"  # a checkpoint's own head wins
    assert decoder_config(_config("llama_gqa")).biases == frozenset()


@pytest.mark.parametrize(
    "kind, module",
    [
        ("llama_gqa", "llama.modeling_llama.LlamaRotaryEmbedding"),
        ("qwen2", "qwen2.modeling_qwen2.Qwen2RotaryEmbedding"),
    ],
)
def test_rope_frequencies_are_transformers_own(kind, module):
    path, name = module.rsplit(".", 1)
    rotary = getattr(importlib.import_module(f"transformers.models.{path}"), name)(_config(kind))
    assert torch.equal(decoder_config(_config(kind)).inv_freq(), rotary.inv_freq)


def test_what_neither_computes_and_what_the_fused_graph_cannot():
    scaled = decoder_config(_config("qwen2", rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert "rope_type is 'linear'" in scaled.unsupported
    assert scaled.fused_unsupported == scaled.unsupported
    window = decoder_config(_config("qwen2_window"))
    assert window.unsupported is None  # the reference computes the window
    with pytest.raises(ExportError, match="fused export: sliding_window 3 < max_position_embeddings 128"):
        check_fused(window)
    assert check_fused(decoder_config(_config("qwen2"))).theta == 10000.0
