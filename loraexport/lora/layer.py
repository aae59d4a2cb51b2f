"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank branch.

LoRA (Hu et al., 2021, §4.1): ``h = W0·x + s·B·A·x`` with ``A`` (r × in) initialised
Kaiming-uniform and ``B`` (out × r) at zero, so training starts from the base model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """Wraps ``base`` (left frozen and untouched) with a rank-``r`` update scaled by ``scaling``.

    Args:
        base: the pretrained linear layer ``W0``; its parameters get ``requires_grad=False``.
        r: rank of the update.
        scaling: ``s`` (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA; see ``LoraConfig``).
        dropout: dropout applied to the input of the low-rank branch only (training).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        features: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        in_f, out_f = features or (base.in_features, base.out_features)  # features: for Conv1D
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT do
        self.r = r
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        update = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # (..., r) then (..., out)
        return base + self.scaling * update

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s·B·A`` computed in ``dtype`` (float32 or wider), shape (out, in)."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


class WeightedLoRALinear(nn.Module):
    """``base(x) + Σ cᵢ·Bᵢ·(Aᵢ·x)``: several adapters' branches on one layer, unmerged.

    The verification reference for a weighted multi-adapter merge (``cᵢ = wᵢ·sᵢ``, kept as
    Python floats so a float64 run of the model uses them exactly). Inference only.
    """

    def __init__(
        self,
        base: nn.Module,
        branches: list[tuple[torch.Tensor, torch.Tensor, float]],
        features: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base
        in_f, out_f = features or (base.in_features, base.out_features)
        for a, b, _ in branches:
            if a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"branch A {tuple(a.shape)} / B {tuple(b.shape)} does not fit {in_f}->{out_f}"
                )
        dtype = base.weight.dtype
        frozen = [
            (nn.Parameter(a.to(dtype), False), nn.Parameter(b.to(dtype), False)) for a, b, _ in branches
        ]
        self.lora_A = nn.ParameterList([a for a, _ in frozen])
        self.lora_B = nn.ParameterList([b for _, b in frozen])
        self.coefficients = [float(c) for _, _, c in branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for a, b, c in zip(self.lora_A, self.lora_B, self.coefficients, strict=True):
            out = out + c * ((x @ a.T) @ b.T)
        return out

    def extra_repr(self) -> str:
        ranks = ", ".join(str(a.shape[0]) for a in self.lora_A)
        return f"ranks=[{ranks}], coefficients={self.coefficients}"
