"""``LoRALinear``: a frozen ``nn.Linear`` plus a trainable low-rank branch.

LoRA (Hu et al., 2021, §4.1): ``h = W0·x + s·B·A·x`` with ``A`` (r × in) initialised
Kaiming-uniform and ``B`` (out × r) at zero, so training starts from the base model.

DoRA (Liu et al., 2024, eq. 5) adds a trained magnitude ``m`` (one per output row):
``h = m / ‖W0 + s·B·A‖ ⊙ (W0·x + s·B·A·x) + bias``, the row norm treated as a constant in the
backward pass (§4.3), and ``m`` initialised to ``‖W0‖`` so training again starts from the base.
This is PEFT's ``DoraLinearLayer``, dropout included.
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
        dora: bool = False,
        transposed: bool = False,
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
        self.transposed = transposed  # Conv1D: the base weight is stored (in, out)
        self.lora_magnitude: nn.Parameter | None = None
        if dora:  # m = ‖W0‖ per output row (B = 0): the layer starts as the base
            with torch.no_grad():
                norm = row_norms(self._w0(), torch.zeros((), dtype=w.dtype, device=w.device))
            self.lora_magnitude = nn.Parameter(norm)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def _w0(self) -> torch.Tensor:
        """The base weight as (out, in)."""
        w = self.base_layer.weight
        return w.T if self.transposed else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        xd = self.dropout(x)
        update = (xd @ self.lora_A.T) @ self.lora_B.T  # (..., r) then (..., out)
        if self.lora_magnitude is None:
            return base + self.scaling * update
        w0 = self._w0().to(x.dtype)
        delta = (self.scaling * (self.lora_B @ self.lora_A)).detach()  # (out, in)
        scale = self.lora_magnitude / row_norms(w0, delta).detach()  # (out,): ‖·‖ a constant (§4.3)
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            plain = base if bias is None else base - bias  # W0·x without the bias
        else:
            plain = xd @ w0.T  # PEFT: with dropout, the rescaled base term sees the dropped input
        return base + (scale - 1) * plain + scale * self.scaling * update

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s·B·A`` computed in ``dtype`` (float32 or wider), shape (out, in)."""
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude is not None else ""
        return f"r={self.r}, scaling={self.scaling:g}{dora}"


def row_norms(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``‖W0 + ΔW‖`` per output row, both (out, in): DoRA's column norm in the paper's layout."""
    return torch.linalg.vector_norm(w0 + delta, dim=1)


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
