"""Merged and unmerged models that share the base's tensors instead of copying them.

Verification holds three models at once — the base, the unmerged reference and the merged
model — and they differ only in the adapted layers. A *view* is a new module tree whose
parameters are the base's own ``nn.Parameter`` objects except where the adapter changes them,
so the three cost one copy of the weights plus the adapted tensors (``merge-and-export`` on a
7B model would otherwise need three).

A view must be treated as read-only where it shares: converting it in place (``.double()``
and back, as parity does) converts the base too, which is exact and harmless when nothing
runs in between; writing into a shared tensor would change the base.
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict

import torch
from torch import nn

from loraexport.errors import AdapterMismatchError
from loraexport.lora.adapter import Adapter
from loraexport.lora.inject import is_transposed, linear_shape
from loraexport.lora.layer import LoRALinear, WeightedLoRALinear
from loraexport.lora.weights import adapter_weights, check_dora


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree holding ``model``'s very parameters and buffers (no tensor copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def set_tensor(model: nn.Module, name: str, value: torch.Tensor, made: dict | None = None) -> None:
    """Give ``model`` a new tensor for parameter or buffer ``name`` (the old one is not written).

    ``made`` maps ``id(value)`` to what was made of it, so a value given for several names
    (tied weights: an embedding and the output head) stays one tensor.
    """
    owner, attr = _owner(model, name)
    made = {} if made is None else made
    if attr in owner._parameters:
        old = owner._parameters[attr]
        if id(value) not in made:
            made[id(value)] = nn.Parameter(value.to(old.dtype), requires_grad=False)
        owner._parameters[attr] = made[id(value)]
    elif attr in owner._buffers:
        if id(value) not in made:
            made[id(value)] = value.to(owner._buffers[attr].dtype)
        owner._buffers[attr] = made[id(value)]
    else:
        raise AdapterMismatchError(f"the base model has no parameter or buffer {name!r}")


def merged_view(base: nn.Module, base_state: dict[str, torch.Tensor], merged_state: dict) -> nn.Module:
    """``base`` with the tensors of ``merged_state`` that are not ``base_state``'s own objects.

    ``merged_state`` comes from ``merge_state_dict(base_state, ...)``, which keeps untouched
    tensors as the very objects of ``base_state``; only the merged ones are new.
    """
    if set(merged_state) != set(base_state):
        raise AdapterMismatchError("merged weights do not have the base model's tensor names")
    model = shared_copy(base)
    made: dict = {}
    for name, t in merged_state.items():
        if t is not base_state[name]:
            set_tensor(model, name, t, made)
    return model.eval()


def unmerged_view(base: nn.Module, adapters: list[Adapter], weights: list[float] | None = None) -> nn.Module:
    """``base`` with every adapter's LoRA branch active: ``W0·x + Σ wᵢ·sᵢ·Bᵢ·(Aᵢ·x)`` (a DoRA
    adapter: its layer rescaled by ``m / ‖W0 + s·B·A‖``, computed in the forward pass).

    The parity reference: nothing is merged. A layer one adapter targets gets a ``LoRALinear``
    (scaling ``w·s``); a layer several target gets a ``WeightedLoRALinear``. Replaced tensors
    (trained biases, ``modules_to_save``) are new tensors; two adapters replacing one tensor
    with different values is an error, as in ``merge_state_dict``.
    """
    weights = adapter_weights(len(adapters), weights)
    check_dora(adapters, weights)  # DoRA: alone, at weight 1, so its layer is a LoRALinear
    model = shared_copy(base)  # ``adapters`` were checked against ``base`` when loaded (``check_fits``)
    replaced: dict[str, torch.Tensor] = {}
    for a in adapters:
        for name, t in a.replacements.items():
            if name in replaced and not torch.equal(replaced[name], t):
                raise AdapterMismatchError(f"two adapters replace {name!r} with different values")
            replaced[name] = t
    for name, t in replaced.items():
        set_tensor(model, name, t)
    branches: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = defaultdict(list)
    magnitudes: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights, strict=True):
        for path, (lora_a, lora_b) in a.weights.items():
            branches[path].append((lora_a, lora_b, w * a.config.scaling(path)))
        magnitudes.update(a.magnitudes)
    with torch.no_grad():
        for path, br in branches.items():
            owner, attr = _owner(model, path)
            layer = getattr(owner, attr)
            if len(br) == 1:
                lora_a, lora_b, c = br[0]
                wrapped: nn.Module = LoRALinear(
                    layer,
                    lora_a.shape[0],
                    c,
                    features=linear_shape(layer),
                    dora=path in magnitudes,
                    transposed=is_transposed(layer),
                )
                wrapped.lora_A.copy_(lora_a.to(wrapped.lora_A.dtype))
                wrapped.lora_B.copy_(lora_b.to(wrapped.lora_B.dtype))
                if path in magnitudes:
                    wrapped.lora_magnitude.copy_(magnitudes[path].to(wrapped.lora_magnitude.dtype))
            else:
                wrapped = WeightedLoRALinear(layer, br, features=linear_shape(layer))
            setattr(owner, attr, wrapped)
    return model.eval()
