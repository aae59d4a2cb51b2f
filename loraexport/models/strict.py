"""Strict loading: every tensor a model needs comes from its checkpoint, and every tensor in the
checkpoint is used or ignored by a rule named here.

transformers fills a missing tensor with random values and drops one no parameter takes, each with
a warning loraexport silences. A base saved from a PEFT-wrapped model (``q_proj.base_layer.weight``
and ``q_proj.lora_A.default.weight`` in place of ``q_proj.weight``) then loads as another model,
and no parameter count tells: the LoRA tensors make it up. So names are matched from the
safetensors headers before any weight is read (``hf_names`` for a transformers model built on
meta; ``refuse`` for the reference model's and the streamed export's own key tables), and for
transformers again against what it reports having loaded (``check_loaded``).

A checkpoint tensor no parameter takes is ignored (``ignorable``) when it is
- a buffer the model computes itself that older savers stored (``COMPUTED_BUFFERS``, or any
  non-persistent buffer of the model);
- declared ignorable by the model's class (transformers' ``_keys_to_ignore_on_load_unexpected``);
- the head of another task (``OTHER_HEADS``) in a model that has no module of that name: the
  masked-LM head of ``bert-base-uncased`` when its encoder is loaded;
and never when its name is PEFT's (``PEFT_NAME``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from loraexport.errors import ModelFormatError

# The names PEFT gives the layers it wraps (LoRA's factors and dropout, the wrapped base layer,
# DoRA's magnitude, modules_to_save's copies) and the prefix of a PeftModel's own state dict.
PEFT_NAME = re.compile(
    r"(?:^|\.)(?:base_layer|lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|lora_dropout"
    r"|modules_to_save|original_module)(?:\.|$)|^base_model\.model\."
)
PEFT_HINT = (
    "the names are PEFT's: this checkpoint was saved from a PEFT-wrapped model; save the plain "
    "model instead (peft_model.unload() for the base, merge_and_unload() for the adapter merged in)"
)
# Buffers a model computes itself, stored by older savers: rotary `inv_freq` (per layer, before
# transformers moved it to the model), `position_ids` (once persistent), GPT-2's causal mask
# `attn.bias` and its `attn.masked_bias` constant (transformers 5 no longer declares the last).
COMPUTED_BUFFERS = re.compile(r"(?:^|\.)(?:rotary_emb\.inv_freq|position_ids|attn\.bias|attn\.masked_bias)$")
# Heads a checkpoint holds beside the base model for its own task: BERT pre-training's `cls`, a
# masked-LM or causal-LM `lm_head`, a classifier's `classifier` or `score`, extractive QA's `qa_outputs`.
OTHER_HEADS = ("cls", "lm_head", "classifier", "score", "qa_outputs")
# Names transformers renames on load, for every model (its conversion mapping's legacy entries).
LEGACY_NAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))


def _natural(name: str) -> tuple:
    """Sort key: ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def refuse(where: str, missing: Iterable[str], unused: Iterable[str]) -> None:
    """``ModelFormatError`` of one line naming the first tensor the checkpoint lacks and the first
    it holds that nothing takes (a PEFT-named one first, then with ``PEFT_HINT``); nothing when
    both are empty. ``where`` starts the line (``<file> does not match config.json``)."""
    missing, unused = sorted(set(missing), key=_natural), sorted(set(unused), key=_natural)
    if not missing and not unused:
        return
    peft = [n for n in unused if PEFT_NAME.search(n)]
    parts = [f"no tensor {missing[0]!r} ({len(missing)} missing)"] if missing else []
    if unused:
        parts.append(f"unexpected tensor {(peft or unused)[0]!r} ({len(unused)} unexpected)")
    raise ModelFormatError(f"{where}: {'; '.join(parts)}" + (f"; {PEFT_HINT}" if peft else ""))


def computed_buffer(name: str) -> bool:
    """A stored copy of a buffer models compute themselves (``COMPUTED_BUFFERS``)."""
    return bool(COMPUTED_BUFFERS.search(name)) and not PEFT_NAME.search(name)


def ignorable(name: str, model: nn.Module) -> bool:
    """A checkpoint tensor no parameter of ``model`` (a transformers model, on meta) takes, that
    loading may leave unused (the module docstring's rules)."""
    if PEFT_NAME.search(name):
        return False
    prefix = getattr(model, "base_model_prefix", "")
    bare = name.removeprefix(f"{prefix}.") if prefix else name
    buffers = {n for n, _ in model.named_buffers()}
    if computed_buffer(name) or bare in buffers or f"{prefix}.{bare}" in buffers:
        return True
    if any(re.search(p, name) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()):
        return True
    head = bare.split(".", 1)[0]
    return head in OTHER_HEADS and head not in dict(model.named_children())


def supplies(supplied: Collection[str], name: str) -> bool:
    """``name`` is one of ``supplied`` (tensor names, or modules: everything under them)."""
    return any(name == s or name.startswith(s + ".") for s in supplied)


@dataclass(frozen=True)
class Names:
    """How a checkpoint's names map onto a model's."""

    params: dict[str, str]  # checkpoint name -> the model's name for it
    ignored: frozenset[str]  # checkpoint names no parameter takes, by an ``ignorable`` rule


def _renamed(name: str) -> str:
    for old, new in LEGACY_NAMES:
        name = name.replace(old, new)
    return name


def _model_name(name: str, state: Mapping[str, object], prefix: str) -> str | None:
    """The model's name for checkpoint tensor ``name``, as transformers matches them: legacy
    names renamed, the base model's prefix added or removed; None if no parameter takes it."""
    name = _renamed(name)
    candidates = (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}") if prefix else (name,)
    return next((c for c in candidates if c in state), None)


def hf_names(model: nn.Module, names: Iterable[str], where: str, supplied: Collection[str] = ()) -> Names:
    """The checkpoint tensors ``names`` against ``model`` (a transformers model built on meta):
    every parameter and persistent buffer comes from one tensor, except tied weights (one name
    of each tie suffices), names the class declares may be missing, and ``supplied`` (tensors or
    modules the caller provides: an adapter's modules_to_save, a head trained from scratch);
    every tensor is taken by one of them or ``ignorable``. Else ``refuse``."""
    state = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    taken: dict[str, str] = {}  # the model's name -> the checkpoint's
    unused, ignored = [], set()
    for name in names:
        target = _model_name(name, state, prefix)
        if target is None:
            if ignorable(name, model):
                ignored |= {name, _renamed(name)}  # transformers reports the renamed name
            else:
                unused.append(name)
        elif target in taken:  # transformers would keep one and drop the other
            raise ModelFormatError(f"{where}: tensors {taken[target]!r} and {name!r} both hold {target!r}")
        else:
            taken[target] = name
    aliases: dict[int, list[str]] = {}
    for n, t in state.items():
        aliases.setdefault(id(t), []).append(n)
    may_miss = getattr(model, "_keys_to_ignore_on_load_missing", None) or ()
    missing = [
        n
        for n, t in state.items()
        if not any(a in taken for a in aliases[id(t)])  # tied: one name of the tie suffices
        and not any(re.search(p, n) for p in may_miss)
        and not supplies(supplied, n)
    ]
    refuse(where, missing, unused)
    return Names({c: m for m, c in taken.items()}, frozenset(ignored))


def check_loaded(
    info: Mapping[str, Collection], where: str, names: Names, supplied: Collection[str] = ()
) -> None:
    """What transformers reports having loaded (``from_pretrained(output_loading_info=True)``)
    agrees with ``hf_names``: no parameter it initialised itself, no tensor it dropped, beyond
    what ``supplied`` and the ignored names allow."""
    missing = [n for n in info.get("missing_keys", ()) if not supplies(supplied, n)]
    refuse(where, missing, [n for n in info.get("unexpected_keys", ()) if n not in names.ignored])
