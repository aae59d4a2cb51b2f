"""Where the fused writer (``export.fused``) takes a model's weights from: a *source* answers by
Hugging Face name. ``ModuleSource`` is a model in memory (``--optimize``), with loraexport's LoRA
wrappers unmerged; ``export.streamed.CheckpointSource`` reads a checkpoint tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from loraexport.errors import ExportError
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear
from loraexport.models.hf.decoder_config import DecoderConfig, decoder_config
from loraexport.models.types import FUSED_TYPES


@dataclass(frozen=True)
class _Linear:
    """A projection: ``y = x·Wᵀ + b + Σ c·(x·Aᵀ)·Bᵀ``; tensors in any float dtype."""

    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None  # (out,)
    branches: tuple[tuple[torch.Tensor, torch.Tensor, float], ...] = ()  # A (r, in), B (out, r), c


class Source(Protocol):
    """Where the writer takes the weights from, by Hugging Face name (``model.layers.0.mlp.up_proj``)."""

    config: Any  # a transformers config (its token ids)
    decoder: DecoderConfig  # what the graph computes from that config
    layers: int

    def linear_shape(self, path: str) -> tuple[int, int]: ...
    def linear(self, path: str) -> _Linear: ...
    def vector(self, name: str) -> torch.Tensor: ...  # a norm's weight
    def embedding(self) -> torch.Tensor: ...
    def lm_head(self) -> _Linear: ...
    def tied_head(self) -> bool: ...  # the LM head's weight is the embedding table itself
    def kept(self) -> bool: ...  # LoRA branches are kept beside the weights (--keep-adapter)


# ---- reading a model in memory ------------------------------------------------------------------
def _checked(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise ExportError(f"fused export needs float32 weights; {where} is {t.dtype}")
    return t.detach().cpu()


def _unwrap(module: nn.Module, where: str) -> tuple[nn.Linear, list]:
    """The base ``nn.Linear`` of a projection and its LoRA branches as (A, B, c) tensors."""
    if isinstance(module, nn.Linear):
        base, branches = module, []
    elif isinstance(module, LoRALinear):
        if module.lora_magnitude is not None:  # refused earlier (check_dora_mode); never written wrong
            raise ExportError(f"fused export: {where} is a DoRA layer, which a fused graph cannot keep")
        base, branches = module.base_layer, [(module.lora_A, module.lora_B, module.scaling)]
    elif isinstance(module, WeightedLoRALinear):
        base = module.base_layer
        branches = list(zip(module.lora_A, module.lora_B, module.coefficients, strict=True))
    else:
        kinds = "nn.Linear, LoRALinear or WeightedLoRALinear"
        raise ExportError(f"fused export: {where} is a {type(module).__name__}, not {kinds}")
    if not isinstance(base, nn.Linear):
        raise ExportError(f"fused export: {where}.base_layer is a {type(base).__name__}, not nn.Linear")
    return base, branches


def _short(path: str) -> str:
    return path.removeprefix("model.")


class ModuleSource:
    """A Llama/Mistral/Qwen2 causal LM in memory (float32), loraexport's LoRA wrappers unmerged."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        family = getattr(config, "model_type", None)
        if family not in FUSED_TYPES or not all(hasattr(model, a) for a in ("model", "lm_head")):
            raise ExportError(
                f"fused export: {type(model).__name__} ({family!r}) is not one of {FUSED_TYPES}"
            )
        self.model, self.config, self.layers = model, config, len(model.model.layers)
        self.decoder = decoder_config(config)

    def linear_shape(self, path: str) -> tuple[int, int]:
        base = _unwrap(self.model.get_submodule(path), _short(path))[0]
        return base.out_features, base.in_features

    def linear(self, path: str) -> _Linear:
        where = _short(path)
        base, branches = _unwrap(self.model.get_submodule(path), where)
        bias = None if base.bias is None else _checked(base.bias, f"{where}.bias")
        arrays = [
            (_checked(a, f"{where}.lora_A"), _checked(b, f"{where}.lora_B"), float(c)) for a, b, c in branches
        ]
        return _Linear(_checked(base.weight, f"{where}.weight"), bias, tuple(arrays))

    def vector(self, name: str) -> torch.Tensor:
        return _checked(self.model.get_parameter(name), _short(name))

    def embedding(self) -> torch.Tensor:
        return _checked(self.model.model.embed_tokens.weight, "embed_tokens.weight")

    def lm_head(self) -> _Linear:
        head = self.linear("lm_head")
        embed = self.embedding()
        if self.decoder.tie and not torch.equal(head.weight, embed):
            raise ExportError("fused export: tie_word_embeddings is set but lm_head.weight != embed_tokens")
        return head  # tied: its weight is the embedding, stored transposed for the MatMul

    def tied_head(self) -> bool:
        return bool(self.decoder.tie)  # lm_head() refuses a head that differs from the embedding

    def kept(self) -> bool:
        return any(isinstance(m, (LoRALinear, WeightedLoRALinear)) for m in self.model.modules())
