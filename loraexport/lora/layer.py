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
