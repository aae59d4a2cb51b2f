"""``ModelFamily``: what the pipeline needs to know about one kind of model, and the registry.

A family is a small object of functions, not a class tower; the pipeline never branches on
which family it holds. Families that need ``transformers`` import it lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraexport.errors import ModelFormatError
from loraexport.export.spec import GraphSpec
from loraexport.io import require_dir
from loraexport.untrusted import read_json, short_repr

Inputs = dict[str, torch.Tensor]


@dataclass
class ParityCase:
    """One batch to compare: inputs of ``forward`` and which logit positions are real."""

    name: str
    inputs: Inputs  # input_ids, attention_mask[, decoder_input_ids]
    valid: torch.Tensor  # (B, T) bool: positions whose logits are compared


@dataclass(frozen=True)
class ModelFamily:
    name: str
    detect: Callable[[dict[str, Any]], bool]  # given config.json
    load: Callable[[Path], nn.Module]  # eval mode, float32
    save: Callable[[nn.Module, Path], None]
    graph_specs: Callable[[nn.Module], list[GraphSpec]]
    runtime_meta: Callable[[nn.Module], dict[str, Any]]  # kind, special tokens, cache shape
    parity_cases: Callable[[nn.Module, int, int], list[ParityCase]]  # (model, n, seed)
    prompts: Callable[[nn.Module, list[str] | None, int, int], list[tuple[Inputs, int]]]
    generate: Callable[[nn.Module, Inputs, int], torch.Tensor]
    latency_inputs: Callable[[nn.Module, int, int], Inputs]  # (model, batch, seq)
    latency_points: tuple[tuple[int, int], ...]
    extra_files: tuple[str, ...] = ()  # copied from the base into the output (tokenizer, ...)
    exporter: str = "dynamo"  # default torch.onnx exporter (see export.onnx.export_graphs)


def _registry() -> list[ModelFamily]:
    from loraexport.models.reference_family import REFERENCE

    families = [REFERENCE]
    try:  # Hugging Face families need transformers (the `hf` extra)
        from loraexport.models.hf import HF_CAUSAL, HF_ENCODER

        families += [HF_CAUSAL, HF_ENCODER]
    except ImportError:
        pass
    return families


def detect_family(directory: str | Path) -> ModelFamily:
    d = require_dir(directory, "model directory")
    cfg = read_json(d / "config.json", ModelFormatError)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{d / 'config.json'}: expected a JSON object")
    for family in _registry():
        if family.detect(cfg):
            return family
    raise ModelFormatError(
        f"{d / 'config.json'}: model_type {short_repr(cfg.get('model_type'))} is not supported "
        f"(supported families: {', '.join(f.name for f in _registry())})"
    )


def load_base(directory: str | Path) -> tuple[ModelFamily, nn.Module]:
    """(family, model in eval mode) for a model directory."""
    family = detect_family(directory)
    return family, family.load(Path(directory))
