"""The configuration a layer-streamed reference decoder (``verify.streamed``) needs, read from
``config.json`` as transformers reads it, and refused where it cannot compute it exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraexport.models.types import FUSED_TYPES, LLAMA, QWEN2


@dataclass(frozen=True)
class DecoderConfig:
    theta: float
    hidden: int
    heads: int
    kv: int
    head_dim: int
    eps: float
    layers: int
    tie: bool
    windows: list  # per layer: the sliding window, or None for full attention


def decoder_config(cfg: dict, where: Path) -> DecoderConfig:
    """``cfg`` (config.json) as the decoder computes it; ``ValueError`` naming ``where`` else."""
    if cfg.get("model_type") not in FUSED_TYPES:
        raise ValueError(f"{where}: model_type {cfg.get('model_type')!r} not in {FUSED_TYPES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    rope = cfg.get("rope_parameters") or {}
    for params in (rope, cfg.get("rope_scaling") or {}):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: RoPE {params} is not supported (only default RoPE)")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    # Sliding-window attention per layer, as transformers decides it (None: full attention).
    window, types = cfg.get("sliding_window") if cfg["model_type"] != LLAMA else None, None
    if cfg["model_type"] == QWEN2:
        window = window if cfg.get("use_sliding_window", False) else None
        first = cfg.get("max_window_layers", 28)  # older configs, without layer_types
        types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "" for i in range(layers)]
    return DecoderConfig(
        theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        hidden=cfg["hidden_size"],
        heads=heads,
        kv=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
        layers=layers,
        tie=bool(cfg.get("tie_word_embeddings", False)),
        windows=[window if types is None or types[i] == "sliding_attention" else None for i in range(layers)],
    )
