"""What a float32 merged file cannot avoid: its weights are W0 + ΔW rounded once to float32.

On a sharp model that rounding alone moves the logits more than float32 arithmetic does (real
SmolLM2-135M with a trained adapter: torch running the file's own weights is 5.1e-3 from the
exact answer on a 4-token row where torch unmerged is 2.4e-4), so parity counts the stored
weights' own error too. It does so only after checking those weights against a second
computation of the merge: the unmerged reference's own layers (``LoRALinear``: W0 + s·B·A, DoRA's
rescaling; ``WeightedLoRALinear``: W0 + Σ c·B·A), in float64, within one float32 rounding. A
wrong merge (a module lost, a wrong scale) is then refused here, not absorbed as noise.
"""

from __future__ import annotations

import torch
from torch import nn

from loraexport.lora.inject import is_transposed
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear, row_norms

# |stored − exact| ≤ this many float32 eps of the weight's largest |value|: one correct rounding
# is at most half an eps of each value; 1 leaves room for float64's own ~1e-16 differences.
STORED_EPS = 1.0
F32_EPS = torch.finfo(torch.float32).eps


def _exact(layer: nn.Module) -> torch.Tensor:
    """The merged weight a layer of the unmerged reference computes, (out, in), in float64."""
    base = layer.base_layer
    w0 = base.weight.detach().double()
    w0 = w0.T if is_transposed(base) else w0
    if isinstance(layer, LoRALinear):
        delta = layer.delta_weight(torch.float64)
        if layer.lora_magnitude is None:
            return w0 + delta
        return (
            layer.lora_magnitude.detach().double().unsqueeze(1)
            / row_norms(w0, delta).unsqueeze(1)
            * (w0 + delta)
        )
    out = w0.clone()
    for a, b, c in zip(layer.lora_A, layer.lora_B, layer.coefficients, strict=True):
        out += c * (b.detach().double() @ a.detach().double())
    return out


def stored_weights_error(unmerged: nn.Module, merged: nn.Module) -> float:
    """Largest |stored − exact| over the adapted layers, in float32 eps of each weight's largest
    |value| (≤ ``STORED_EPS``: the merged model holds the correctly rounded merge)."""
    worst = 0.0
    with torch.no_grad():
        for path, layer in unmerged.named_modules():
            if not isinstance(layer, (LoRALinear, WeightedLoRALinear)):
                continue
            exact = _exact(layer)
            target = merged.get_submodule(path)
            stored = target.weight.detach().double()
            stored = stored.T if is_transposed(target) else stored
            if stored.shape != exact.shape:
                return float("inf")
            err = float((stored - exact).abs().max()) / (F32_EPS * max(float(exact.abs().max()), 1e-30))
            worst = max(worst, err if err == err else float("inf"))  # NaN: not the merge
    return worst
