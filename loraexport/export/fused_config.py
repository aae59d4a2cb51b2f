"""What of a model's configuration the fused graph (``export.fused``) cannot express, found
from the configuration alone: a transformers config, or ``config.json`` read as an object
(``stages.export.check_optimize`` refuses such a model before any weight is read).

No torch here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loraexport.errors import ExportError
from loraexport.models.hf.common import end_token_ids, generation_eos
from loraexport.models.types import LLAMA, QWEN2


def check_config(config: Any) -> float:
    """The RoPE base (rope_theta), after refusing (``ExportError``) what the fused graph cannot
    compute: an activation other than SiLU, RoPE other than the default, partial rotary, a
    sliding window that can take effect. ``config``: attributes, or a dict (``config.json``)."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"fused export: hidden_act {config.hidden_act!r} is not silu")
    theta = _rope_theta(config)
    _check_window(config)
    return theta


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise ExportError(f"fused export supports default RoPE only; rope_type is {kind!r}")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise ExportError(f"fused export: partial_rotary_factor {config.partial_rotary_factor} unsupported")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _check_window(config) -> None:
    """Refuse a sliding window that can take effect (shorter than the longest sequence)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    used = window is not None and getattr(config, "use_sliding_window", True) is not False
    used = used and (types is None or any(t != "full_attention" for t in types))
    if used and window < config.max_position_embeddings:
        limit = config.max_position_embeddings
        raise ExportError(f"fused export: sliding_window {window} < max_position_embeddings {limit}")
    if types is not None and any(t not in ("full_attention", "sliding_attention") for t in types):
        raise ExportError(f"fused export: unsupported layer_types {sorted(set(types))}")


def bias_allowed(config: Any, module: str) -> bool:
    """Whether transformers builds the projection ``module`` (``...self_attn.q_proj``) with a bias,
    as the config says: Qwen2's q/k/v always; Llama's attention projections with ``attention_bias``
    and its MLP with ``mlp_bias``; Mistral's and every LM head never. A bias tensor a checkpoint
    holds where the config has none is not part of the model (transformers ignores it too)."""
    get = (
        config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    )
    name = module.rsplit(".", 1)[-1]
    kind = get("model_type")
    if kind == QWEN2:
        return name in ("q_proj", "k_proj", "v_proj")
    if kind == LLAMA and name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return bool(get("attention_bias", False))
    if kind == LLAMA and name in ("gate_proj", "up_proj", "down_proj"):
        return bool(get("mlp_bias", False))
    return False


def model_facts(config, model_dir: Path) -> dict:
    """``loraexport.json``'s ``model``: the facts a reader of a streamed export acts on, from its config
    and ``model_dir``'s generation_config.json, as transformers reads them for a model in memory
    (the streamed proof holds the description to them)."""
    heads = config.num_attention_heads
    ends = end_token_ids(generation_eos(model_dir), config.eos_token_id)
    return {
        "kind": "causal",
        "model_type": config.model_type,
        "special_tokens": {
            "bos": config.bos_token_id,
            "eos": ends[0] if ends else None,
            "pad": config.pad_token_id,
        },
        "eos_token_ids": ends,
        "n_layers": config.num_hidden_layers,
        "attention_heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "family": "hf-causal",
    }
