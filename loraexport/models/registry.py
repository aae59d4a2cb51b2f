"""The model families loraexport knows, and loading a model directory through the one that
claims its ``config.json``.

The Hugging Face families are listed when ``transformers`` is installed (the ``hf`` extra);
they import it only when a model is loaded. A caller with a family of its own passes
``families``: nothing here is changed at run time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loraexport.core.io import require_dir
from loraexport.core.untrusted import read_json, short_repr
from loraexport.errors import ModelFormatError
from loraexport.models.base import ModelFamily
from loraexport.models.hf import HF_CAUSAL, HF_ENCODER
from loraexport.models.reference_family import REFERENCE

FAMILIES: tuple[ModelFamily, ...] = (
    REFERENCE,
    *((HF_CAUSAL, HF_ENCODER) if importlib.util.find_spec("transformers") is not None else ()),
)


@dataclass(frozen=True)
class ModelDir:
    """A loaded model directory: its family, the model (eval mode, float32), its tokenizer
    (None when it has none, or its family uses none) and where it was read from."""

    family: ModelFamily
    model: nn.Module
    tokenizer: Any | None
    path: Path


def detect_family(directory: str | Path, families: Sequence[ModelFamily] = FAMILIES) -> ModelFamily:
    """The family whose ``detect`` accepts ``directory/config.json``."""
    d = require_dir(directory, "model directory")
    cfg = read_json(d / "config.json", ModelFormatError)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{d / 'config.json'}: expected a JSON object")
    for family in families:
        if family.detect(cfg):
            return family
    raise ModelFormatError(
        f"{d / 'config.json'}: model_type {short_repr(cfg.get('model_type'))} is not supported "
        f"(supported families: {', '.join(f.name for f in families)})"
    )


def load_model_dir(
    directory: str | Path, families: Sequence[ModelFamily] = FAMILIES, supplied: Collection[str] = ()
) -> ModelDir:
    """Model and tokenizer of ``directory``, each read and checked once. The tokenizer comes
    first: a broken one is refused before the weights are read. ``supplied``: tensors or modules
    the caller provides itself, which the checkpoint may lack (``ModelFamily.load``)."""
    family = detect_family(directory, families)
    path = Path(directory)
    tokenizer = family.tokenizer(path)
    return ModelDir(family, family.load(path, supplied), tokenizer, path)


def load_base(directory: str | Path) -> tuple[ModelFamily, nn.Module]:
    """(family, model in eval mode) for a model directory; its tokenizer is checked too."""
    loaded = load_model_dir(directory)
    return loaded.family, loaded.model
