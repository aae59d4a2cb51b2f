"""``LoraConfig``: a dataclass mirroring PEFT's ``adapter_config.json`` for LoRA.

Only what changes the math is modelled. Keys PEFT writes that do not affect a LoRA merge are
accepted and kept (so a round trip preserves them); DoRA (``use_dora``) is modelled; keys that
switch on a variant we do not implement (LoRA bias, aLoRA, ...) are refused by name, never skipped.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from loraexport.core.io import short_repr
from loraexport.errors import AdapterFormatError, UnsupportedAdapterError

try:  # the parser behind re.compile, to look at a pattern's structure (renamed in Python 3.11)
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

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


# How PEFT embeds user patterns in its regexes: rank/alpha_pattern keys match a suffix of the
# module path (get_pattern_key); layers_pattern names the module list before the layer index.
_SUFFIX_REGEX = r"(.*\.)?({})$"
_LAYERS_REGEX = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."
_MAX_RANK = 2**31 - 1  # no tensor dimension is larger; also keeps alpha/sqrt(r) a float


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite_number(v: Any) -> bool:
    try:
        return _is_number(v) and math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_rank(v: Any) -> bool:
    return _is_index(v) and 1 <= v <= _MAX_RANK


# Regexes from adapter_config.json are matched (as PEFT matches them, with re) against every module
# name, and Python's re has no timeout: a pattern that backtracks exponentially, like "(a+)+$",
# would hang the tool on one long module name. Such patterns are refused when the config is read.
#
# _MAX_REGEX_LEN bounds what re.compile, the structure check below and re's cache spend on one
# pattern, and keeps a hostile file from packing thousands of groups into one. Real patterns are
# far shorter: PEFT's own examples are under 100 characters ('.*\.(q_proj|v_proj)$'), and the
# longest common ones, Unsloth's generated vision-model patterns (get_peft_regex: every linear
# layer name in one alternation, twice), run 300-700; hence a cap well above those.
_MAX_REGEX_LEN = 2000
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_GROUPS = {_sre.SUBPATTERN, _sre.ASSERT, _sre.ASSERT_NOT, getattr(_sre, "ATOMIC_GROUP", _sre.SUBPATTERN)}


def _nested_repeat(pattern: str) -> str | None:
    r"""What in ``pattern`` (a valid regex) can backtrack exponentially, or None.

    The rule: inside a repetition that may repeat more than once (``*``, ``+``, ``{2,}``...),
    no other repetition (``(a+)+``, ``(a?)*``, ``(\w+\.)*``), no alternation (``(a|aa)+``) and
    no back-reference: each lets the engine split the same text in exponentially many ways before
    it gives up. Real PEFT patterns repeat single characters or classes (``.*``, ``\d+``,
    ``[\d]{1,}``) and keep alternations and optional groups (``(q|v)_proj``, ``(.*\.)?``) outside
    any repetition, so they never trip it. Polynomial backtracking (``.*.*.*x``) is not caught.
    """
    stack: list[tuple[Any, bool]] = [(_sre_parse.parse(pattern), False)]
    while stack:  # iterative: a pattern nested hundreds of groups deep must not hit the recursion limit
        items, inside = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                if inside:
                    return "a repetition inside a repetition"
                stack.append((av[2], av[1] > 1))
            elif op is _sre.BRANCH:
                if inside:
                    return "an alternation inside a repetition"
                stack.extend((branch, inside) for branch in av[1])
            elif op is _sre.GROUPREF_EXISTS:
                if inside:
                    return "a conditional group inside a repetition"
                stack.extend((branch, inside) for branch in av[1:] if branch is not None)
            elif op is _sre.GROUPREF:
                if inside:
                    return "a back-reference inside a repetition"
            elif op in _GROUPS:
                stack.append((av if op is getattr(_sre, "ATOMIC_GROUP", None) else av[-1], inside))
    return None


def target_regex_problem(pattern: str) -> str | None:
    """What keeps ``pattern`` (``train --target-regex``: ``target_modules`` as one regex) from
    being used, as the adapter's config would be refused for it; None: nothing."""
    found = _regex_problem(pattern, "{}")
    return found[1] if found else None


def _check_regex(key: str, pattern: str, template: str) -> None:
    """``pattern`` compiles where PEFT puts it, and cannot backtrack for hours on a module name."""
    found = _regex_problem(pattern, template)
    if found:
        error, problem = found
        raise error(f"adapter_config.json: {key!r} regex {short_repr(pattern)}{problem}")


def _regex_problem(pattern: str, template: str) -> tuple[type[Exception], str] | None:
    """(the error class, what is wrong) of ``pattern`` embedded in ``template``; None: usable."""
    if len(pattern) > _MAX_REGEX_LEN:
        return UnsupportedAdapterError, (
            f" is {len(pattern)} characters long; refusing regexes over {_MAX_REGEX_LEN}"
        )
    regex = template.format(pattern)
    try:
        with warnings.catch_warnings():  # FutureWarning for "[[" and the like: not an error
            warnings.simplefilter("ignore")
            re.compile(regex)
            nested = _nested_repeat(regex)  # as embedded: the template may hold the user's groups
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        return AdapterFormatError, f": {e}"
    if nested:
        why = "which can take exponential time to match; refusing it (rewrite it without nesting)"
        return UnsupportedAdapterError, f" has {nested}, {why}"
    return None


def _invalid(key: str, must: str, value: Any) -> AdapterFormatError:
    return AdapterFormatError(f"adapter_config.json: {key!r} must be {must}, got {short_repr(value)}")


def _check_names(
    key: str, value: Any, template: str, optional: bool = True, each_a_regex: bool = False
) -> None:
    """A regex string, or a list of names (non-empty unless ``optional``; regexes if ``each_a_regex``)."""
    if value is None and optional:
        return
    if isinstance(value, str):
        _check_regex(key, value, template)
    elif isinstance(value, list) and (value or optional) and all(isinstance(t, str) for t in value):
        for t in value if each_a_regex else ():
            _check_regex(key, t, template)
    else:
        what = (
            "a regex string or a list of names" if optional else "a regex string or a non-empty list of names"
        )
        raise _invalid(key, what, value)


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
    use_dora: bool = False  # DoRA (Liu et al. 2024): W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ per output row
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
        """Raise ``AdapterFormatError`` naming the key when a value is of the wrong kind.

        Everything the merge later computes from the config is checked here, so an accepted
        config cannot fail later: numbers finite, flags booleans, patterns compilable regexes.
        """
        if self.peft_type != "LORA":
            raise UnsupportedAdapterError(
                f"adapter_config.json: peft_type {short_repr(self.peft_type)} is not supported (only 'LORA')"
            )
        if not _is_rank(self.r):
            raise _invalid("r", "a positive integer below 2**31", self.r)
        if not _is_finite_number(self.lora_alpha):
            raise _invalid("lora_alpha", "a finite number", self.lora_alpha)
        if not _is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise _invalid("lora_dropout", "in [0, 1)", self.lora_dropout)
        for key in ("fan_in_fan_out", "use_rslora", "use_dora"):
            if not isinstance(getattr(self, key), bool):
                raise _invalid(key, "true or false", getattr(self, key))
        if not isinstance(self.bias, str) or self.bias not in _BIAS_VALUES:
            raise _invalid("bias", f"one of {_BIAS_VALUES}", self.bias)
        _check_names("target_modules", self.target_modules, "{}", optional=False)
        _check_names("exclude_modules", self.exclude_modules, "{}")
        _check_names("layers_pattern", self.layers_pattern, _LAYERS_REGEX, each_a_regex=True)
        for name, pattern, ok, what in (
            ("rank_pattern", self.rank_pattern, _is_rank, "ranks"),
            ("alpha_pattern", self.alpha_pattern, _is_finite_number, "finite numbers"),
        ):
            if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and ok(v) for k, v in pattern.items()
            ):
                raise _invalid(name, f"a map of module patterns to {what}", pattern)
            for key in pattern:
                _check_regex(name, key, _SUFFIX_REGEX)
        layers = self.layers_to_transform
        if not (
            layers is None or _is_index(layers) or isinstance(layers, list) and all(map(_is_index, layers))
        ):
            raise _invalid("layers_to_transform", "a layer index or a list of them", layers)
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
            raise _invalid("modules_to_save", "a list of module names", mts)
        for key in ("base_model_name_or_path", "task_type"):
            if not isinstance(getattr(self, key), (str, type(None))):
                raise _invalid(key, "a string or null", getattr(self, key))

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
            if re.match(_SUFFIX_REGEX.format(key), module_path):
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
                m = re.match(_LAYERS_REGEX.format(p), module_path)
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
            if key == "use_dora" and value is None:  # off, as older PEFT configs may write it
                kwargs[key] = False
            elif key in known:
                kwargs[key] = value
            elif key in _VARIANT_KEYS:
                if not _is_off(value):
                    raise UnsupportedAdapterError(
                        f"adapter_config.json: {key}={short_repr(value)} ({_VARIANT_KEYS[key]}) "
                        "is not supported"
                    )
            elif key in _PASSIVE_KEYS or _is_off(value):
                extra[key] = value
            else:
                raise UnsupportedAdapterError(
                    f"adapter_config.json: unknown key {short_repr(key)}={short_repr(value)}; "
                    "refusing to guess what it changes"
                )
        for key in ("r", "lora_alpha"):
            if key not in data:
                raise AdapterFormatError(f"adapter_config.json: missing key {key!r}")
        return cls(**kwargs, extra=extra)
