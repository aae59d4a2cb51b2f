"""The model-family registry: find which family a model directory belongs to and load it."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from loraexport.errors import ModelFormatError
from loraexport.io import read_json, require_dir
from loraexport.models import reference


def detect_family(directory: str | Path) -> str:
    d = require_dir(directory, "model directory")
    cfg = read_json(d / "config.json", ModelFormatError)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{d / 'config.json'}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type == reference.MODEL_TYPE:
        return "reference"
    raise ModelFormatError(
        f"{d}: model_type {model_type!r} is not supported (supported: {reference.MODEL_TYPE!r})"
    )


def load_base(directory: str | Path) -> tuple[str, nn.Module]:
    """(family name, model in eval mode) for a model directory."""
    family = detect_family(directory)
    return family, reference.load_model(directory)
