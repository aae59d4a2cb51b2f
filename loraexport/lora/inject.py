"""Wrap and unwrap target ``nn.Linear`` modules of a model with ``LoRALinear``."""

from __future__ import annotations

import difflib

from torch import nn

from loraexport.errors import AdapterMismatchError
from loraexport.lora.config import LoraConfig
from loraexport.lora.layer import LoRALinear


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a layer LoRA can wrap: ``nn.Linear``, or transformers' ``Conv1D``
    (GPT-2; weight stored (in, out), which PEFT marks ``fan_in_fan_out``); else None."""
    if type(module) is nn.Linear:
        return module.in_features, module.out_features
    cls = type(module)
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f)
    return None


def is_transposed(module: nn.Module) -> bool:
    """True for ``Conv1D``: its weight is (in, out), so ΔW is merged transposed."""
    return type(module) is not nn.Linear and linear_shape(module) is not None


def linear_names(model: nn.Module) -> list[str]:
    """Module paths of every layer LoRA can wrap (``nn.Linear``, GPT-2's ``Conv1D``)."""
    return [name for name, m in model.named_modules() if linear_shape(m) is not None]


def target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that ``config`` targets, matched as PEFT matches them.

    Raises ``AdapterMismatchError`` when nothing matches (a typo in ``target_modules`` must not
    silently train or merge nothing).
    """
    names = [n for n in linear_names(model) if config.matches(n)]
    if not names:
        candidates = sorted({n.rsplit(".", 1)[-1] for n in linear_names(model)})
        raise AdapterMismatchError(
            f"target_modules {config.target_modules!r} match no linear layer of the model "
            f"(its linear layers are named {', '.join(candidates)})"
        )
    return names


def check_ranks(model: nn.Module, config: LoraConfig) -> None:
    """What training an adapter with ``config`` needs: every module it targets is a linear layer
    (``check_linear_targets``), and every targeted layer can hold its rank: r <= min(in, out). A
    larger r adds parameters (memory grows with r) but cannot raise the rank of ΔW = B·A;
    refused naming the layer."""
    check_linear_targets(model, config)
    for path in target_names(model, config):
        in_f, out_f = linear_shape(model.get_submodule(path))
        r = config.rank(path)
        if r > min(in_f, out_f):
            raise AdapterMismatchError(
                f"rank {r} is larger than {path} can use: it is {out_f}×{in_f}, so ΔW = B·A has rank "
                f"at most {min(in_f, out_f)}; choose a rank of at most {min(in_f, out_f)}"
            )


def check_linear_targets(model: nn.Module, config: LoraConfig) -> None:
    """``config`` targets linear layers only. An embedding or a whole block it also matched was
    recorded in the adapter's target_modules with no tensors for it, and every reader of the
    adapter (merge, export, PEFT) then refused it as malformed."""
    linear = set(linear_names(model))
    other = next((n for n, m in model.named_modules() if n and n not in linear and config.matches(n)), None)
    if other is not None:
        kind = type(model.get_submodule(other)).__name__
        raise AdapterMismatchError(
            f"target_modules {config.target_modules!r} match {other} ({kind}), which is not a linear "
            "layer: LoRA is trained here on linear layers only; name those (e.g. q_proj, v_proj)"
        )


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def suggest(path: str, known: list[str]) -> str:
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def inject(model: nn.Module, config: LoraConfig) -> dict[str, LoRALinear]:
    """Replace each targeted ``nn.Linear`` of ``model`` in place by a ``LoRALinear``.

    Every base parameter is frozen (including those not targeted); only ``lora_A`` and
    ``lora_B`` (and DoRA's ``lora_magnitude``) are trainable. Returns ``{module_path: LoRALinear}``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: dict[str, LoRALinear] = {}
    for path in target_names(model, config):
        parent, child = _parent(model, path)
        base = getattr(parent, child)
        layer = LoRALinear(
            base,
            config.rank(path),
            config.scaling(path),
            config.lora_dropout,
            features=linear_shape(base),
            dora=config.use_dora,
            transposed=is_transposed(base),
        )
        setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def unwrap(model: nn.Module) -> nn.Module:
    """Put every wrapped base ``nn.Linear`` back, dropping the LoRA branches (no merge)."""
    for path, layer in lora_layers(model).items():
        parent, child = _parent(model, path)
        setattr(parent, child, layer.base_layer)
    return model
