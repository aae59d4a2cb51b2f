"""``Adapter``: a ``LoraConfig`` plus ``{module_path: (A, B)}``, in PEFT's on-disk layout.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r),
exactly as ``peft.PeftModel.save_pretrained`` writes them; a DoRA adapter also holds
``...lora_magnitude_vector`` (out,) per module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraexport.core.io import (
    load_safetensors,
    read_json,
    require_dir,
    save_safetensors,
    sha256_dir,
    write_json,
)
from loraexport.errors import AdapterFormatError, AdapterMismatchError, UnsupportedAdapterError
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import (
    inject,
    is_transposed,
    linear_names,
    linear_shape,
    lora_layers,
    suggest,
    target_names,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
# PEFT saves DoRA's magnitude without the ".weight" of its module (save_pretrained renames it back)
_MAGNITUDE = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"
)
MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


@dataclass
class Adapter:
    """A LoRA adapter: ``weights[path] = (A, B)`` with A (r × in), B (out × r); with DoRA
    (``config.use_dora``), ``magnitudes[path] = m`` (out,) for every module."""

    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    path: Path | None = None
    # Base parameters the adapter replaces outright: biases trained with bias="all"/"lora_only"
    # and the weights of ``modules_to_save`` (a classifier head, say), by parameter name.
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA's m, by module path

    # ---- reading ----------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, allow_pickle: bool = False) -> Adapter:
        """Read a PEFT adapter directory; every problem is an error naming the file or key."""
        d = require_dir(directory, "adapter directory")
        config = LoraConfig.from_dict(read_json(d / CONFIG_NAME, AdapterFormatError))
        tensors = _read_tensors(d, allow_pickle)
        weights: dict[str, dict[str, torch.Tensor]] = {}
        replacements: dict[str, torch.Tensor] = {}
        magnitudes: dict[str, torch.Tensor] = {}
        held: dict[str, str] = {}  # what each tensor gives -> its key
        for key, t in tensors.items():
            m = _KEY.match(key)
            if m is not None:
                _hold(held, f"lora_{m['which']} of {m['path']!r}", key, d)
                weights.setdefault(m["path"], {})[m["which"]] = t
                continue
            m = _MAGNITUDE.match(key)
            if m is not None:
                if m["path"] in magnitudes:
                    raise AdapterFormatError(f"{d / WEIGHTS_NAME}: two magnitude vectors for {m['path']!r}")
                magnitudes[m["path"]] = t
                continue
            name = _replacement_name(key, config)
            if name is None:
                raise AdapterFormatError(
                    f"{d / WEIGHTS_NAME}: unexpected tensor {key!r} (expected "
                    f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
                    + (", a trained bias" if config.bias != "none" else "")
                    + (", or a weight of modules_to_save" if config.modules_to_save else "")
                    + ")"
                )
            _hold(held, f"{name!r}", key, d)
            replacements[name] = t
        if not weights:
            raise AdapterFormatError(f"{d / WEIGHTS_NAME}: holds no LoRA tensors")
        pairs = {}
        for path, ab in sorted(weights.items()):
            for which in "AB":
                if which not in ab:
                    raise AdapterFormatError(f"adapter: tensor missing: '{PREFIX}{path}.lora_{which}.weight'")
            pairs[path] = (ab["A"], ab["B"])
        adapter = cls(config, pairs, d, replacements, magnitudes)
        adapter.validate()
        return adapter

    def validate(self) -> None:
        """Shapes consistent with the config's ranks; values finite."""
        for path, (a, b) in self.weights.items():
            if a.ndim != 2 or b.ndim != 2:
                raise AdapterFormatError(
                    f"adapter: {path}: lora_A and lora_B must be matrices, got shapes "
                    f"{tuple(a.shape)} and {tuple(b.shape)}"
                )
            if a.shape[0] != b.shape[1]:
                raise AdapterFormatError(
                    f"adapter: {path}: rank mismatch, lora_A is {tuple(a.shape)} (r × in) but "
                    f"lora_B is {tuple(b.shape)} (out × r)"
                )
            r = self.config.rank(path)
            if a.shape[0] != r:
                raise AdapterFormatError(
                    f"adapter: {path}: tensors have rank {a.shape[0]} but adapter_config.json "
                    f"gives r={r} for this module"
                )
            for which, t in (("A", a), ("B", b)):
                if not t.is_floating_point():
                    raise AdapterFormatError(
                        f"adapter: {path}.lora_{which}: dtype {t.dtype} is not floating point"
                    )
                if not _all_finite(t):
                    raise AdapterFormatError(
                        f"adapter: '{PREFIX}{path}.lora_{which}.weight' contains NaN or Inf; "
                        "refusing to merge"
                    )
        self._validate_magnitudes()
        for name, t in self.replacements.items():
            if t.is_complex():  # merged by a cast that would drop the imaginary part
                raise AdapterFormatError(
                    f"adapter: '{PREFIX}{name}' has complex dtype {t.dtype}; refusing to merge"
                )
            if t.is_floating_point() and not _all_finite(t):
                raise AdapterFormatError(f"adapter: '{PREFIX}{name}' contains NaN or Inf; refusing to merge")

    def _validate_magnitudes(self) -> None:
        """DoRA: one finite, floating (out,) magnitude per module; none without ``use_dora``."""
        if not self.config.use_dora:
            if self.magnitudes:
                first = sorted(self.magnitudes)[0]
                raise AdapterFormatError(
                    f"adapter: '{PREFIX}{first}{MAGNITUDE_SUFFIX}' is a DoRA magnitude but "
                    "adapter_config.json has use_dora=false"
                )
            return
        for path, (_, b) in sorted(self.weights.items()):
            m = self.magnitudes.get(path)
            key = f"'{PREFIX}{path}{MAGNITUDE_SUFFIX}'"
            if m is None:
                raise AdapterFormatError(f"adapter: use_dora is set but tensor {key} is missing")
            if not m.is_floating_point() or tuple(m.shape) != (b.shape[0],):
                raise AdapterFormatError(
                    f"adapter: {key} must be a floating-point vector of {b.shape[0]} (lora_B's rows), "
                    f"got {m.dtype} {tuple(m.shape)}"
                )
            if not _all_finite(m):
                raise AdapterFormatError(f"adapter: {key} contains NaN or Inf; refusing to merge")
        extra = sorted(set(self.magnitudes) - set(self.weights))
        if extra:
            raise AdapterFormatError(
                f"adapter: '{PREFIX}{extra[0]}{MAGNITUDE_SUFFIX}' has no lora_A/lora_B beside it"
            )

    def check_targets(self, expected: set[str]) -> None:
        """The adapter holds tensors for exactly the ``expected`` module paths (those its config
        targets in the base): none missing, none extra."""
        missing = sorted(expected - set(self.weights))
        if missing:
            raise AdapterFormatError(
                f"adapter: tensor missing for targeted module {missing[0]!r} "
                f"('{PREFIX}{missing[0]}.lora_A.weight'); {len(missing)} module(s) missing in all"
            )
        extra = sorted(set(self.weights) - expected)
        if extra:
            raise AdapterMismatchError(
                f"adapter holds tensors for {extra[0]!r}, which adapter_config.json's target_modules "
                f"{self.config.target_modules!r} does not target"
            )

    def check_fits(self, model: nn.Module) -> None:
        """The adapter's modules are exactly the model's targeted linears, with fitting shapes.

        Also resolves ``fan_in_fan_out`` as PEFT does: True for GPT-2's ``Conv1D`` targets
        (weights stored (in, out)), False for ``nn.Linear``, whatever the config says.
        """
        modules = dict(model.named_modules())
        known = linear_names(model)
        for path in sorted(self.weights):  # the first missing module, in a stable order
            a, b = self.weights[path]
            mod = modules.get(path)
            if mod is None or linear_shape(mod) is None:
                what = "not found in" if mod is None else "not a linear layer of"
                raise AdapterMismatchError(
                    f"target module {path!r} is {what} the base model{suggest(path, known)} "
                    "(is this adapter for another architecture?)"
                )
            in_f, out_f = linear_shape(mod)
            if a.shape[1] != in_f or b.shape[0] != out_f:
                raise AdapterMismatchError(
                    f"adapter module {path!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                    f"fit a linear layer of {in_f} -> {out_f} features"
                )
        self.check_targets(set(target_names(model, self.config)))
        state = model.state_dict()
        for name, t in self.replacements.items():
            if name not in state:
                raise AdapterMismatchError(
                    f"adapter replaces {name!r}, which the base model does not have"
                    f"{suggest(name, list(state))}"
                )
            if tuple(state[name].shape) != tuple(t.shape):
                raise AdapterMismatchError(
                    f"adapter tensor for {name!r} has shape {tuple(t.shape)} but the base's is "
                    f"{tuple(state[name].shape)}"
                )
        transposed = {is_transposed(modules[p]) for p in self.weights}
        if len(transposed) > 1:
            raise UnsupportedAdapterError("adapter targets both Linear and Conv1D layers; not supported")
        if transposed:
            self.config.fan_in_fan_out = transposed.pop()

    # ---- writing ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write PEFT's layout into an existing (empty) directory."""
        d = Path(directory)
        write_json(d / CONFIG_NAME, self.config.to_dict())
        tensors = {f"{PREFIX}{name}": t.detach().cpu() for name, t in self.replacements.items()}
        for path, (a, b) in self.weights.items():
            tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach().cpu()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach().cpu()
        for path, m in self.magnitudes.items():
            tensors[f"{PREFIX}{path}{MAGNITUDE_SUFFIX}"] = m.detach().cpu()
        save_safetensors(d / WEIGHTS_NAME, tensors)

    # ---- model interplay --------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, config: LoraConfig) -> Adapter:
        """Collect the (trained) A and B (and DoRA's m) of every ``LoRALinear`` in ``model``."""
        layers = lora_layers(model)
        return cls(
            config,
            {p: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for p, m in layers.items()},
            magnitudes={
                p: m.lora_magnitude.detach().clone()
                for p, m in layers.items()
                if m.lora_magnitude is not None
            },
        )

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject LoRA branches into ``model`` (in place) and load this adapter's tensors.

        The result is the *unmerged* model: base weights untouched, LoRA active.
        """
        self.check_fits(model)
        with torch.no_grad():
            params = dict(model.named_parameters())
            params.update(dict(model.named_buffers()))
            for name, t in self.replacements.items():
                params[name].copy_(t.to(params[name].dtype))
        layers = inject(model, self.config)
        with torch.no_grad():
            for path, layer in layers.items():
                a, b = self.weights[path]
                layer.lora_A.copy_(a.to(layer.lora_A.dtype))
                layer.lora_B.copy_(b.to(layer.lora_B.dtype))
                if layer.lora_magnitude is not None:
                    layer.lora_magnitude.copy_(self.magnitudes[path].to(layer.lora_magnitude.dtype))
        return model

    @property
    def num_parameters(self) -> int:
        lora = sum(a.numel() + b.numel() for a, b in self.weights.values())
        return lora + sum(m.numel() for m in self.magnitudes.values())

    def sha256(self) -> str:
        if self.path is None:
            raise ValueError("adapter was not loaded from a directory")
        return sha256_dir(self.path)


def _all_finite(t: torch.Tensor) -> bool:
    """isfinite for every floating dtype (torch has no isfinite for some float8 types)."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # exact: float32 holds every float8 value, inf and nan included
    return bool(torch.isfinite(t).all())


def _hold(held: dict[str, str], what: str, key: str, d: Path) -> None:
    """Each LoRA factor and replaced tensor comes from one key: PEFT's names with and without
    ``.default`` (or ``base_layer``, ``modules_to_save``) for one tensor would leave one unused."""
    if what in held:
        raise AdapterFormatError(f"{d / WEIGHTS_NAME}: tensors {held[what]!r} and {key!r} both give {what}")
    held[what] = key


def _replacement_name(key: str, config: LoraConfig) -> str | None:
    """The base parameter a non-LoRA adapter tensor replaces, or None if it may not replace one.

    PEFT writes trained biases of targeted layers as ``<module>.base_layer.bias``, other trained
    biases (bias="all") as ``<module>.bias``, and ``modules_to_save`` weights under their own names.
    """
    if not key.startswith(PREFIX):
        return None
    name = key[len(PREFIX) :].replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    if config.bias != "none" and name.endswith(".bias"):
        return name
    if config.saves_module(name):
        return name
    return None


def _read_tensors(d: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, pkl = d / WEIGHTS_NAME, d / PICKLE_NAME
    if st.is_file():
        return load_safetensors(st, AdapterFormatError)
    if pkl.is_file():
        if not allow_pickle:
            raise AdapterFormatError(
                f"{pkl}: pickle adapter files are not loaded by default (they can run code); "
                "convert it to safetensors, or pass --allow-pickle to load it with weights_only=True"
            )
        try:
            data = torch.load(pkl, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise AdapterFormatError(f"{pkl}: cannot be loaded with weights_only=True ({_why(e)})") from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
        ):
            raise AdapterFormatError(f"{pkl}: does not hold a dict of tensors by name")
        return data
    raise AdapterFormatError(f"{WEIGHTS_NAME} not found in {d}")


def _why(e: Exception) -> str:
    """One line from torch.load's many-line failure (which also suggests weights_only=False)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # the weights-only unpickler met a forbidden object
        detail = text.split("WeightsUnpickler error:", 1)[1]
        line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
        return f"it holds something other than tensors: {line}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for advice in ADVICE:  # never pass on torch's advice to turn its safety off
        line = line.split(advice, 1)[0].rstrip(" .:;(")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


# Where torch.load's messages start advising weights_only=False (one line of the legacy format's
# failure says so mid-line): cut there.
ADVICE = ("Re-running `torch.load`", "In PyTorch 2.6", "(1) ")
