"""Checks on a model directory before anything is allocated.

A ``config.json`` decides how much memory a model takes (a width of 65536 is 17 GB per layer),
while the checkpoint beside it may be a few kilobytes; building the model first and comparing
afterwards lets a hostile or broken directory exhaust memory. So a config is checked in three
steps, all before a real tensor is made: its values (types, ranges: ``check_hf_config``), the
model it implies, built on the meta device (no storage), against the safetensors headers
(``check_state_shapes``, ``check_hf_checkpoint``: every tensor the model needs and no other,
by name (``strict``), with its shape and a float dtype), and only then the real load. The headers come from
``lora.stream.read_header``, which validates every offset against the file's size, so what a
checkpoint "holds" is bounded by the bytes on disk.

Errors are ``ModelFormatError``s of one line naming the file, the key and the value.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from loraexport.core.untrusted import read_json, short_repr
from loraexport.errors import ModelFormatError
from loraexport.lora.stream import TensorInfo, checkpoint_shards, read_header
from loraexport.models.strict import Names, hf_names, refuse
from loraexport.models.types import ROBERTA

FLOAT_CODES = ("F32", "F16", "BF16", "F64")  # safetensors dtypes loraexport takes as weights

# Integer keys of the Hugging Face configs loraexport loads (GPT-2's own names included):
# key -> (lowest, highest, may be null). The upper bounds are far above any real model (the
# largest widths are ~25k, vocabularies ~256k, depths ~126 layers, contexts 10M) and keep every
# size product of the meta build far from int64 overflow; the checkpoint check below bounds
# the real sizes.
HF_INTS: dict[str, tuple[int, int, bool]] = {
    "vocab_size": (1, 2**24, False),
    "hidden_size": (1, 2**17, False),
    "n_embd": (1, 2**17, False),
    "intermediate_size": (1, 2**19, False),
    "n_inner": (1, 2**19, True),
    "num_attention_heads": (1, 2**12, False),
    "n_head": (1, 2**12, False),
    "num_key_value_heads": (1, 2**12, True),
    "head_dim": (1, 2**12, True),
    "num_hidden_layers": (1, 1024, False),  # each layer is Python objects even on meta: bound it
    "n_layer": (1, 1024, False),
    "max_position_embeddings": (2, 2**24, False),
    "n_positions": (2, 2**24, False),
    "n_ctx": (2, 2**24, False),
    "type_vocab_size": (1, 2**16, False),
    "num_labels": (1, 2**14, False),  # transformers builds (and copies) an id2label entry per label
    "sliding_window": (1, 2**24, True),
    "max_window_layers": (0, 1024, True),
}
# Float keys: (lowest, highest); NaN and infinities are refused (JSON parsers accept them).
HF_FLOATS: dict[str, tuple[float, float]] = {
    "layer_norm_eps": (0.0, 1.0),
    "layer_norm_epsilon": (0.0, 1.0),
    "rms_norm_eps": (0.0, 1.0),
    "initializer_range": (0.0, 1e3),
    "rope_theta": (1e-6, 1e30),
    "hidden_dropout_prob": (0.0, 1.0),
    "attention_probs_dropout_prob": (0.0, 1.0),
    "attention_dropout": (0.0, 1.0),
    "resid_pdrop": (0.0, 1.0),
    "embd_pdrop": (0.0, 1.0),
    "attn_pdrop": (0.0, 1.0),
    "summary_first_dropout": (0.0, 1.0),
    "partial_rotary_factor": (1e-6, 1.0),
}
# The same, inside rope_parameters / rope_scaling (transformers 5 writes rope_theta there)
ROPE_FLOATS: dict[str, tuple[float, float]] = {
    "rope_theta": HF_FLOATS["rope_theta"],
    "partial_rotary_factor": (1e-6, 1.0),
    "factor": (1e-6, 1e6),
}
HF_BOOLS = ("tie_word_embeddings", "is_decoder", "add_cross_attention", "is_encoder_decoder")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
# Special-token keys of tokenizer_config.json: a string, an AddedToken's dict form, or null.
TOKENIZER_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
TOKENIZER_SPECIALS += ("mask_token",)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(where: Path | str, key: str, value: object, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ModelFormatError(
            f"{where}: {key} must be an integer from {low} to {high}, got {short_repr(value)}"
        )
    return value


def check_hf_config(raw: Mapping[str, Any], where: Path) -> None:
    """The values of a Hugging Face ``config.json`` (a parsed JSON object) that decide what
    transformers builds: types and ranges, before transformers sees any of them."""
    for key, (low, high, nullable) in HF_INTS.items():
        if key in raw and not (nullable and raw[key] is None):
            check_int(where, key, raw[key], low, high)
    _check_floats(raw, HF_FLOATS, where, "")
    for key in HF_BOOLS:
        if key in raw and not isinstance(raw[key], bool):
            raise ModelFormatError(f"{where}: {key} must be true or false, got {short_repr(raw[key])}")
    if raw.get("is_encoder_decoder"):
        raise ModelFormatError(f"{where}: is_encoder_decoder is true; this model family is not one")
    check_token_ids(raw, where)
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ModelFormatError(
            f"{where}: architectures must be a list of class names, got {short_repr(archs)}"
        )
    cls = raw.get("tokenizer_class")
    if cls is not None and not (isinstance(cls, str) and cls.isidentifier()):
        raise ModelFormatError(f"{where}: tokenizer_class must be a class name, got {short_repr(cls)}")
    for key in ("hidden_act", "activation_function"):
        if key in raw and not isinstance(raw[key], str):
            raise ModelFormatError(f"{where}: {key} must be an activation's name, got {short_repr(raw[key])}")
    if raw.get("quantization_config") is not None:
        raise ModelFormatError(
            f"{where}: quantization_config is set; loraexport merges into float weights only "
            "(dequantise the model first)"
        )
    for key in ("rope_scaling", "rope_parameters"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ModelFormatError(f"{where}: {key} must be an object or null, got {short_repr(raw[key])}")
        if isinstance(raw.get(key), dict):  # transformers 5 keeps rope_theta here
            _check_floats(raw[key], ROPE_FLOATS, where, f"{key}.")


def _check_floats(raw: Mapping[str, Any], table: Mapping[str, tuple[float, float]], where: Path, prefix: str):
    for key, (low, high) in table.items():
        v = raw.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise ModelFormatError(
                f"{where}: {prefix}{key} must be a number from {low:g} to {high:g}, got {short_repr(v)}"
            )


def read_checked_config(path: Path) -> dict:
    """``config.json`` at ``path``, read bounded, its values checked (``check_hf_config``)."""
    raw = read_json(path, ModelFormatError)
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    check_hf_config(raw, path)
    return raw


def check_token_ids(raw: Mapping[str, Any], where: Path) -> None:
    """Special token ids (``config.json``, ``generation_config.json``): integers or null, and
    ``eos_token_id`` may list several. A token outside the vocabulary is allowed (transformers
    only warns, and small test models keep GPT-2's 50256), never used to index a table."""
    for key in TOKEN_IDS:
        v = raw.get(key)
        ids = v if key == "eos_token_id" and isinstance(v, list) else [v]
        if v is not None and not (ids and all(_is_int(i) and -(2**31) <= i < 2**31 for i in ids)):
            raise ModelFormatError(f"{where}: {key} must be a token id (an integer), got {short_repr(v)}")


def hf_value(raw: Mapping[str, Any], config: Any, attr: str) -> tuple[str, Any]:
    """(the key as the file names it, its value) of a config attribute, ``config``'s value when
    the file does not set it: GPT-2's ``n_embd`` is ``hidden_size`` (its ``attribute_map``)."""
    alias = getattr(config, "attribute_map", {}).get(attr)
    for key in (alias, attr):
        if key and key in raw:
            return key, raw[key]
    return alias or attr, getattr(config, attr, None)


def check_hf_shapes(raw: Mapping[str, Any], defaults: Any, where: Path) -> None:
    """What the values imply together, before transformers builds a config from them (its
    validators raise multi-line errors, or none). ``defaults`` is the family's config built
    with no arguments: its values stand in for keys the file does not set, and its
    ``attribute_map`` gives each family's names (GPT-2's ``n_embd`` for ``hidden_size``)."""

    for attr, alias in getattr(defaults, "attribute_map", {}).items():
        both = (raw.get(attr), raw.get(alias))
        if (
            attr in raw
            and alias in raw
            and not any(isinstance(v, (list, dict)) for v in both)
            and both[0] != both[1]
        ):
            raise ModelFormatError(
                f"{where}: {alias} {short_repr(raw[alias])} and {attr} {short_repr(raw[attr])} name the "
                "same value and disagree"
            )

    def value(attr: str) -> tuple[str, Any]:
        return hf_value(raw, defaults, attr)

    (wk, width), (hk, heads) = value("hidden_size"), value("num_attention_heads")
    if width % heads:  # transformers' validators require it even with an explicit head_dim
        raise ModelFormatError(f"{where}: {hk} {heads} does not divide {wk} {width}")
    kk, kv = value("num_key_value_heads")
    if kv is not None and heads % kv:
        raise ModelFormatError(f"{where}: {kk} {kv} does not divide {hk} {heads}")
    (pk, pad), (vk, vocab) = value("pad_token_id"), value("vocab_size")
    if pad is not None and not -vocab <= pad < vocab:
        raise ModelFormatError(f"{where}: {pk} {pad} is not a token of the vocabulary ({vk} {vocab})")
    if raw.get("model_type") == ROBERTA and pad is None:  # RoBERTa numbers positions after it
        raise ModelFormatError(f"{where}: {pk} must be set for a RoBERTa model, got null")


def check_tokenizer_config(raw: object, where: Path) -> None:
    """What transformers reads from ``tokenizer_config.json`` without checking its type."""
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where}: expected a JSON object, got {short_repr(raw)}")
    cls = raw.get("tokenizer_class")
    if cls is not None and not (isinstance(cls, str) and cls.isidentifier()):
        raise ModelFormatError(f"{where}: tokenizer_class must be a class name, got {short_repr(cls)}")
    for key in TOKENIZER_SPECIALS:
        v = raw.get(key)
        if (
            v is not None
            and not isinstance(v, str)
            and not (isinstance(v, dict) and isinstance(v.get("content"), str))
        ):
            raise ModelFormatError(f"{where}: {key} must be a string, got {short_repr(v)}")
    v = raw.get("model_max_length")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 1):
        raise ModelFormatError(f"{where}: model_max_length must be a positive number, got {short_repr(v)}")
    for key in ("added_tokens_decoder", "auto_map"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ModelFormatError(f"{where}: {key} must be an object, got {short_repr(raw[key])}")


# ---- config against checkpoint --------------------------------------------------------------
def checkpoint_tensors(
    directory: Path, shards: Iterable[str] | None = None
) -> dict[str, tuple[Path, TensorInfo]]:
    """Every tensor of the safetensors checkpoint in ``directory`` (``shards``, else the single
    file or the shards of its index), by name, with the file that holds it: headers only, each
    one fully validated."""
    if shards is None:
        shards, _ = checkpoint_shards(directory)
    out: dict[str, tuple[Path, TensorInfo]] = {}
    for shard in shards:
        path = directory / shard
        try:
            tensors, _ = read_header(path)
        except OSError as e:
            raise ModelFormatError(f"{path}: cannot be read ({e.strerror or e})") from e
        for t in tensors:
            if t.name in out:
                raise ModelFormatError(f"{path}: tensor {t.name!r} is also in {out[t.name][0].name}")
            out[t.name] = (path, t)
    return out


def _require_float(path: Path, t: TensorInfo) -> None:
    if t.dtype not in FLOAT_CODES:
        raise ModelFormatError(
            f"{path}: tensor {t.name!r} is {t.dtype}; model weights must be floating point "
            f"({', '.join(FLOAT_CODES)})"
        )


def check_state_shapes(
    expected: Mapping[str, tuple[int, ...]], tensors: Iterable[TensorInfo], path: Path
) -> None:
    """A checkpoint holds exactly the tensors ``expected`` (name -> shape, from the model
    ``config.json`` describes, built on meta), each of float dtype and of that shape."""
    got = {t.name: t for t in tensors}
    mismatch = f"{path} does not match config.json"
    refuse(mismatch, [n for n in expected if n not in got], [n for n in got if n not in expected])
    for name, shape in expected.items():
        t = got[name]
        _require_float(path, t)
        if tuple(t.shape) != tuple(shape):
            raise ModelFormatError(
                f"{mismatch}: tensor {name!r} has shape {t.shape}, config.json implies {list(shape)}"
            )


_LAYER = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks)\.(\d{1,9})\.")


def check_hf_depth(key: str, layers: int, tensors: Iterable[str], config: Path) -> None:
    """No more layers than the checkpoint has tensors for (``h.3.``, ``layers.3.``,
    ``layer.3.``), before the model is built on meta: transformers takes seconds to build a
    thousand layers even without storage. Checkpoints named otherwise are left to
    ``check_hf_checkpoint``."""
    indices = {int(m.group(1)) for name in tensors if (m := _LAYER.search(name))}
    if indices and layers > max(indices) + 1:
        raise ModelFormatError(
            f"{config}: {key} is {layers} but the checkpoint holds the tensors of {max(indices) + 1} layers"
        )


def check_hf_checkpoint(
    meta: nn.Module,
    tensors: Mapping[str, tuple[Path, TensorInfo]],
    config: Path,
    supplied: Collection[str] = (),
) -> Names:
    """A Hugging Face model built on meta from ``config`` against its checkpoint's headers.

    Names first (``strict.hf_names``): every parameter comes from a tensor (tied weights from one
    of their names, ``supplied`` tensors or modules from the caller), every tensor is taken or
    ignorable; names may carry the base model's prefix or not (a ``BertModel`` saved inside a
    classifier, or the reverse). Then each tensor taken: a float dtype and the parameter's shape,
    which bounds what the real load allocates by the size of the files. Returns the names.
    """
    names = hf_names(meta, tensors, f"{config.parent}: the checkpoint does not match {config.name}", supplied)
    state = meta.state_dict(keep_vars=True)
    for name, key in names.params.items():
        path, t = tensors[name]
        if state[key].is_floating_point():  # parameters (a persistent buffer may be an integer)
            _require_float(path, t)
        shape = tuple(state[key].shape)
        if tuple(t.shape) != shape:
            raise ModelFormatError(
                f"{path} does not match {config}: tensor {name!r} has shape {t.shape}, "
                f"config.json implies {list(shape)}"
            )
    return names
