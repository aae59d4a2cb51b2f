"""``LoraConfig``: a dataclass mirroring PEFT's ``adapter_config.json`` for LoRA.

Only what changes the math is modelled. Keys PEFT writes that do not affect a plain LoRA
merge are accepted and kept (so a round trip preserves them); keys that switch on a
variant we do not implement (DoRA, LoRA bias, ...) are refused by name, never skipped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from loraexport.errors import AdapterFormatError, UnsupportedAdapterError

DEFAULT_TARGETS = ("q", "v")  # Wq and Wv: the LoRA paper's best choice at a fixed budget (§7.1)

# Keys PEFT writes that carry no math for a LoRA merge (bookkeeping, training-time only).
_PASSIVE_KEYS = {
    "auto_mapping",
    "inference_mode",
    "init_lora_weights",
    "peft_version",
    "revision",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "ensure_weight_tying",
    "lora_ga_config",
    "eva_config",
    "corda_config",  # initialisation schemes: weights are saved
}
# Keys that select a variant we do not implement; allowed only at their "off" value.
_VARIANT_KEYS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QALoRA",
    "arrow_config": "Arrow routing",
    "megatron_config": "Megatron parallel layers",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}
_BIAS_VALUES = ("none", "all", "lora_only")


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass
class LoraConfig:
    """PEFT's LoRA configuration, as written in ``adapter_config.json``.

    ``scaling(module_path)`` gives ``s`` in ``W' = W0 + s·B·A``: ``alpha/r``, or
    ``alpha/sqrt(r)`` with rsLoRA (Kalajdzievski 2023), with the per-module rank and
    alpha from ``rank_pattern``/``alpha_pattern`` matched as PEFT matches them.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    peft_type: str = "LORA"
    extra: dict[str, Any] = field(default_factory=dict)  # passive PEFT keys, kept verbatim

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``AdapterFormatError`` naming the key when a value is of the wrong kind."""
        if self.peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"adapter_config.json: peft_type {self.peft_type!r} is not supported (only 'LORA')"
            )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterFormatError(f"adapter_config.json: 'r' must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise AdapterFormatError(
                f"adapter_config.json: 'lora_alpha' must be a number, got {self.lora_alpha!r}"
            )
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise AdapterFormatError(
                f"adapter_config.json: 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}"
            )
        if self.bias not in _BIAS_VALUES:
            raise AdapterFormatError(
                f"adapter_config.json: 'bias' must be one of {_BIAS_VALUES}, got {self.bias!r}"
            )
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                raise AdapterFormatError(f"adapter_config.json: 'target_modules' regex {tm!r}: {e}") from e
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
            raise AdapterFormatError(
                "adapter_config.json: 'target_modules' must be a regex string or a non-empty "
                f"list of names, got {tm!r}"
            )
        for name, pattern, kind in (
            ("rank_pattern", self.rank_pattern, int),
            ("alpha_pattern", self.alpha_pattern, (int, float)),
        ):
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
                for k, v in pattern.items()
            ):
                raise AdapterFormatError(
                    f"adapter_config.json: {name!r} must map module patterns to numbers, got {pattern!r}"
                )
        if any(v < 1 for v in self.rank_pattern.values()):
            raise AdapterFormatError(
                f"adapter_config.json: rank_pattern ranks must be >= 1: {self.rank_pattern}"
            )
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
            raise AdapterFormatError(
                f"adapter_config.json: 'modules_to_save' must be a list of module names, got {mts!r}"
            )

    def saves_module(self, param_name: str) -> bool:
        """Whether ``param_name`` belongs to a module in ``modules_to_save`` (PEFT's rule)."""
        return any(
            re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", param_name) for m in self.modules_to_save or []
        )

    # ---- PEFT semantics ---------------------------------------------------------------
    @staticmethod
    def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
        # PEFT's get_pattern_key: the first pattern that matches a suffix of the path.
        for key in patterns:
            if re.match(rf"(.*\.)?({key})$", module_path):
                return key
        return None

    def rank(self, module_path: str) -> int:
        key = self._pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha(self, module_path: str) -> float:
        key = self._pattern_key(self.alpha_pattern, module_path)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    def scaling(self, module_path: str) -> float:
        r, alpha = self.rank(module_path), self.alpha(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def matches(self, module_path: str) -> bool:
        """Whether PEFT would put a LoRA branch on ``module_path`` (check_target_module_exists)."""
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str) and re.fullmatch(ex, module_path):
                return False
            if isinstance(ex, list) and (module_path in ex or any(module_path.endswith("." + e) for e in ex)):
                return False
        tm = self.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, module_path) is not None
        if module_path in tm:
            return True
        if not any(module_path.endswith("." + t) for t in tm):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_path)
        else:
            m = None
            for p in [patterns] if isinstance(patterns, str) else patterns:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module_path)
                if m:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers

    # ---- (de)serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        out.setdefault("use_dora", False)
        out.setdefault("init_lora_weights", True)
        out.setdefault("inference_mode", True)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: Any) -> LoraConfig:
        if not isinstance(data, dict):
            raise AdapterFormatError(
                f"adapter_config.json must hold a JSON object, got {type(data).__name__}"
            )
        if "peft_type" not in data:
            raise AdapterFormatError("adapter_config.json: missing key 'peft_type'")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _VARIANT_KEYS:
                if not _is_off(value):
                    raise UnsupportedAdapterError(
                        f"adapter_config.json: {key}={value!r} ({_VARIANT_KEYS[key]}) is not supported"
                    )
            elif key in _PASSIVE_KEYS or _is_off(value):
                extra[key] = value
            else:
                raise UnsupportedAdapterError(
                    f"adapter_config.json: unknown key {key!r}={value!r}; refusing to guess what it changes"
                )
        for key in ("r", "lora_alpha"):
            if key not in data:
                raise AdapterFormatError(f"adapter_config.json: missing key {key!r}")
        return cls(**kwargs, extra=extra)
