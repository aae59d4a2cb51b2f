"""``ModelFamily``: what the pipeline needs to know about one kind of model.

A family is a small object of functions, not a class tower; the pipeline never branches on
which family it holds. Families that need ``transformers`` import it lazily. This module is
the protocol only: the families are listed in ``models.registry``, which imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraexport.lora.config import DEFAULT_TARGETS
from loraexport.models.spec import GraphSpec

Inputs = dict[str, torch.Tensor]


@dataclass
class ParityCase:
    """One batch to compare: inputs of ``forward`` and which logit positions are real."""

    name: str
    inputs: Inputs  # input_ids, attention_mask[, decoder_input_ids]
    valid: torch.Tensor  # (B, T) bool: positions whose logits are compared


@dataclass(frozen=True)
class ModelFamily:
    """The functions of one kind of model. ``load`` and ``tokenizer`` check what they read and
    raise ``ModelFormatError``; ``registry.load_model_dir`` calls both, once each."""

    name: str
    detect: Callable[[dict[str, Any]], bool]  # given config.json
    # (directory, supplied) -> the model in eval mode, float32, every tensor from the checkpoint
    # but ``supplied`` (names of tensors or modules the caller provides: models.strict)
    load: Callable[[Path, Collection[str]], nn.Module]
    tokenizer: Callable[[Path], Any | None]  # the directory's tokenizer, checked; None: none
    save: Callable[[nn.Module, Path], None]
    graph_specs: Callable[[nn.Module], list[GraphSpec]]
    runtime_meta: Callable[[nn.Module], dict[str, Any]]  # kind, special tokens, cache shape
    parity_cases: Callable[[nn.Module, int, int], list[ParityCase]]  # (model, n, seed)
    # (model, tokenizer or None, sources or None, n, seed) -> [(inputs, new tokens)]
    prompts: Callable[[nn.Module, Any | None, list[str] | None, int, int], list[tuple[Inputs, int]]]
    generate: Callable[[nn.Module, Inputs, int], torch.Tensor]
    latency_inputs: Callable[[nn.Module, int, int], Inputs]  # (model, batch, seq)
    latency_points: tuple[tuple[int, int], ...]
    extra_files: tuple[str, ...] = ()  # copied from the base into the output (tokenizer, ...)
    exporter: str = "dynamo"  # default torch.onnx exporter (see export.onnx.export_graphs)
    # --optimize (export.optimize): the graphs with the LM head on the last position, for the
    # model types ``optimizes`` accepts (given config.json); None: the family has none
    optimized_specs: Callable[[nn.Module], list[GraphSpec]] | None = None
    optimizes: Callable[[dict[str, Any]], bool] = lambda cfg: False
    # ``train`` without --targets: the layers it adapts, as this family names them (the attention
    # query and value projections, the LoRA paper's choice at a fixed budget, §7.1); the default
    # names the reference Transformer's
    default_targets: Callable[[nn.Module], tuple[str, ...]] = lambda model: DEFAULT_TARGETS
    # (model, tokenizer, texts) -> the texts as cases for a quantized export's quality figures, for
    # a family without generation (an encoder); None: random token ids there
    text_cases: Callable[[nn.Module, Any, list[str]], list[ParityCase]] | None = None
