"""The one reader of a Llama / Mistral / Qwen2 configuration (``FUSED_TYPES``): what the fused
graph writer (``export.fused``, its sources) and the layer-streamed reference (``verify.streamed``)
compute from, read once, as transformers reads it, into a ``DecoderConfig``.

A field the fused graph or the reference computes with (RoPE, sliding windows, biases, tied
embeddings, sizes) is read here; the writer and the reference take the facts, and the RoPE
frequencies both compute with (``DecoderConfig.inv_freq``). (The torch.onnx path of every causal
family reads its cache sizes in ``common.cache_dims``; value bounds for every family are
``checks.check_hf_config``'s.) What neither can compute, and what the fused graph cannot, is
said here too (``unsupported``, ``fused_unsupported``); each caller raises its own error with it.

``config``: a transformers config (attributes) or ``config.json`` as a dict. A checkpoint's
``config.json`` is read bounded and its sizes checked by ``read_config`` (``common.read_config``
for transformers') before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraexport.core.io import read_json
from loraexport.core.untrusted import short_repr
from loraexport.errors import ExportError, ModelFormatError
from loraexport.models.hf import common
from loraexport.models.types import FUSED_TYPES, LLAMA, QWEN2

CONFIG = "config.json"
LAYER_TYPES = ("full_attention", "sliding_attention")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-style decoder's configuration as both the fused writer and the reference compute it."""

    model_type: str
    hidden: int
    heads: int
    kv: int  # key/value heads (GQA: each serves heads // kv query heads)
    head_dim: int
    layers: int
    intermediate: int | None  # None: not in a config.json dict (the reference does not need it)
    vocab: int | None
    max_positions: int | None
    eps: float  # RMSNorm's
    theta: float  # RoPE's base
    tie: bool  # tie_word_embeddings
    windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full attention
    biases: frozenset[str]  # the projections built with a bias (``q_proj``, ``down_proj``, …)
    unsupported: str | None  # why neither the writer nor the reference computes it, or None
    fused_unsupported: str | None  # why the fused graph cannot (unsupported, or a sliding window)

    def bias(self, module: str) -> bool:
        """Whether transformers builds the projection ``module`` (``...self_attn.q_proj``) with a
        bias. A bias tensor a checkpoint holds where the config has none is not part of the model
        (transformers ignores it too)."""
        return module.rsplit(".", 1)[-1] in self.biases

    def head_name(self, has_lm_head: bool) -> str | None:
        """The tensor the LM head multiplies by: the checkpoint's own ``lm_head.weight`` (transformers
        keeps it even when the config ties it), else the embedding when tied, else None."""
        if has_lm_head:
            return "lm_head.weight"
        return "model.embed_tokens.weight" if self.tie else None

    def inv_freq(self):
        """RoPE's inverse frequencies (head_dim / 2,) in float32, as transformers computes them."""
        import torch

        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))


def read_config(model_dir: Path) -> dict:
    """``config.json`` of a fused-family checkpoint, read bounded, its sizes checked, or
    ``ModelFormatError``."""
    config = read_json(model_dir / CONFIG, ModelFormatError)
    if not isinstance(config, dict):
        raise ModelFormatError(f"{model_dir / CONFIG}: not a JSON object")
    kind = config.get("model_type")
    if kind not in FUSED_TYPES:
        raise ModelFormatError(
            f"{model_dir}: model_type {kind!r}: a streamed export writes {', '.join(FUSED_TYPES)} only"
        )
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings"):
        value = config.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20):
            raise ModelFormatError(
                f"{model_dir / CONFIG}: {key} must be an integer from 1 to {1 << 20} for a streamed export, "
                f"got {short_repr(value)}"
            )
    if not isinstance(config.get("rms_norm_eps", 1e-6), int | float):
        raise ModelFormatError(f"{model_dir / CONFIG}: rms_norm_eps must be a number")
    return config


def decoder_config(config: Any) -> DecoderConfig:
    """``config`` (a transformers config, or config.json as a dict) as the decoder computes it.
    Never refuses: what cannot be computed is in ``unsupported`` / ``fused_unsupported``."""
    get = (
        config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    )
    kind, hidden, heads, layers = (
        get("model_type"),
        get("hidden_size"),
        get("num_attention_heads"),
        get("num_hidden_layers"),
    )
    rope = get("rope_parameters") or {}
    windows = _windows(get, kind, layers)
    unsupported = _unsupported(get, kind, rope)
    return DecoderConfig(
        model_type=kind,
        hidden=hidden,
        heads=heads,
        kv=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        layers=layers,
        intermediate=get("intermediate_size"),
        vocab=get("vocab_size"),
        max_positions=get("max_position_embeddings"),
        eps=float(get("rms_norm_eps", 1e-6)),
        theta=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
        tie=bool(get("tie_word_embeddings", False)),
        windows=windows,
        biases=_biases(get, kind),
        unsupported=unsupported,
        fused_unsupported=unsupported or _window_used(get, windows),
    )


def _unsupported(get, kind, rope: dict) -> str | None:
    """Why neither the writer nor the reference computes the model: another family, an activation
    other than SiLU, RoPE other than the default (scaled, partial), unknown layer types."""
    if kind not in FUSED_TYPES:
        return f"model_type {kind!r} not in {FUSED_TYPES}"
    act = get("hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} is not supported (not silu)"
    for params in (rope, get("rope_scaling") or {}):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            return f"rope_type is {rope_type!r}: only default RoPE is supported"
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            return f"partial_rotary_factor {factor}: only default RoPE is supported"
    factor = get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        return f"partial_rotary_factor {factor}: only default RoPE is supported"
    types = get("layer_types")
    if types is not None and any(t not in LAYER_TYPES for t in types):
        return f"unsupported layer_types {sorted(set(types))}"
    return None


def _windows(get, kind, layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window as transformers decides it (None: full attention): Llama none,
    Mistral ``sliding_window`` in every layer, Qwen2 under ``use_sliding_window`` in the layers
    ``layer_types`` (older configs: ``max_window_layers``) makes sliding."""
    window, types = get("sliding_window") if kind != LLAMA else None, None
    if kind == QWEN2:
        window = window if get("use_sliding_window", False) else None
        first = get("max_window_layers", 28)  # older configs, without layer_types
        types = get("layer_types") or ["sliding_attention" if i >= first else "" for i in range(layers)]
    return tuple(window if types is None or types[i] == "sliding_attention" else None for i in range(layers))


def _window_used(get, windows: tuple[int | None, ...]) -> str | None:
    """A sliding window that can take effect (shorter than the longest sequence): in a layer as the
    model computes it, or named and not turned off (``use_sliding_window``, every layer full
    attention), the fused graph's cautious reading of any family's config."""
    window, types, limit = get("sliding_window"), get("layer_types"), get("max_position_embeddings")
    named = window is not None and get("use_sliding_window", True) is not False
    named = named and (types is None or any(t != "full_attention" for t in types))
    computed = [w for w in windows if w is not None]
    for w in ([window] if named else []) + computed:
        if limit is None or w < limit:
            return f"sliding_window {w} < max_position_embeddings {limit}"
    return None


def _biases(get, kind) -> frozenset[str]:
    """The projections built with a bias: Qwen2's q/k/v always; Llama's attention projections with
    ``attention_bias`` and its MLP with ``mlp_bias``; Mistral's and every LM head never."""
    if kind == QWEN2:
        return frozenset(ATTENTION[:3])
    if kind != LLAMA:
        return frozenset()
    return frozenset(
        (ATTENTION if get("attention_bias", False) else ()) + (MLP if get("mlp_bias", False) else ())
    )


def check_fused(c: DecoderConfig) -> DecoderConfig:
    """``c``, after refusing (``ExportError``) what the fused graph cannot compute."""
    if c.fused_unsupported is not None:
        raise ExportError(f"fused export: {c.fused_unsupported}")
    return c


def check_fused_dir(model_dir: str | Path) -> DecoderConfig:
    """``model_dir``'s config as the writer reads it (transformers', its values checked first:
    ``common.read_config``; ``ModelFormatError``), then ``check_fused``. No weight is read."""
    return check_fused(decoder_config(common.read_config(Path(model_dir))[1].get_text_config(decoder=True)))


def model_facts(config, model_dir: Path) -> dict:
    """``loraexport.json``'s ``model``: the facts a reader of a streamed export acts on, from its config
    and ``model_dir``'s generation_config.json, as transformers reads them for a model in memory
    (the streamed proof holds the description to them)."""
    c = decoder_config(config)
    ends = common.end_token_ids(common.generation_eos(model_dir), config.eos_token_id)
    return {
        "kind": "causal",
        "model_type": c.model_type,
        "special_tokens": {
            "bos": config.bos_token_id,
            "eos": ends[0] if ends else None,
            "pad": config.pad_token_id,
        },
        "eos_token_ids": ends,
        "n_layers": c.layers,
        "attention_heads": c.heads,
        "kv_heads": c.kv,
        "head_dim": c.head_dim,
        "hidden_size": c.hidden,
        "vocab_size": c.vocab,
        "context_length": c.max_positions,
        "family": "hf-causal",
    }
