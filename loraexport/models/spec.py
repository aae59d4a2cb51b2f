"""``GraphSpec``: one ONNX graph a model family wants exported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class GraphSpec:
    name: str  # file stem: "model", "encoder", "decoder"
    module: nn.Module  # takes flat tensors, returns a tuple of tensors
    args: tuple[torch.Tensor, ...]  # example inputs
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[Any, ...]  # {axis: Dim} per named arg, then a tuple for *caches
