"""The merge math: ``W' = W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ``, computed wide, checked, cast once.

DoRA (one adapter, weight 1): ``W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖``, the norm and the
factor per output row, as PEFT's ``merge_and_unload`` defines it, in the same wide dtype.

Merging is a pure function over a state dict (``merge_state_dict``); nothing merges as a
side effect. The product and the sum run in float64 by default (float32 at the least), so
the stored weight is the correctly rounded value of the exact sum; a half-precision
storage dtype is applied once, at the end, and the error that cast adds is recorded.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from loraexport.errors import AdapterFormatError, AdapterMismatchError, InvalidInputError
from loraexport.lora.adapter import Adapter
from loraexport.lora.weights import adapter_weights, check_dora

WIDE_DTYPES = (torch.float32, torch.float64)


@dataclass
class ModuleMerge:
    """What merging one module did: the size of the update and what the final cast cost."""

    module: str
    max_abs_delta: float  # max |Σ w·s·B·A|
    max_abs_weight: float  # max |W0|
    cast_max_abs_err: float = 0.0  # max |W'_stored − W'_wide|; 0 when stored in float32+
    cast_max_rel_err: float = 0.0  # the same, relative to max |W'_wide|


@dataclass
class MergeStats:
    compute_dtype: str
    storage_dtype: str
    seconds: float = 0.0
    modules: list[ModuleMerge] = field(default_factory=list)

    @property
    def modules_merged(self) -> int:
        return len(self.modules)

    def to_json(self) -> dict:
        """As ``report.json`` and ``merge.json`` hold it."""
        return {
            "modules_merged": self.modules_merged,
            "seconds": self.seconds,
            "compute_dtype": self.compute_dtype,
            "storage_dtype": self.storage_dtype,
            "modules": [asdict(x) for x in self.modules],
        }


def delta_weight(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    fan_in_fan_out: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``s·B·A`` in ``dtype``; transposed to (in, out) for ``fan_in_fan_out`` (GPT-2 Conv1D)."""
    d = (b.to(dtype) @ a.to(dtype)).mul_(scaling)  # (out, in); in place: one full-size buffer
    return d.T if fan_in_fan_out else d


def _amax(t: torch.Tensor) -> float:
    """max |t| without a full-size temporary."""
    return float(torch.linalg.vector_norm(t, ord=float("inf"))) if t.numel() else 0.0


def cast_checked(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t.to(dtype)``, refusing values the dtype cannot hold (float16 overflows to ±inf past 65504)."""
    out = t.to(dtype)
    if out.is_floating_point() and out.numel() and not math.isfinite(_amax(out)) and math.isfinite(_amax(t)):
        info = torch.finfo(dtype)
        # float16 overflows where bfloat16 and float32 do not; past float32's range, none helps
        fix = (
            "store it in bfloat16 or float32"
            if info.max < 1e10  # float16's ±65504
            else "no floating-point format a model stores holds it: check the adapter's scale and weights"
        )
        raise InvalidInputError(
            f"{name!r} holds values beyond {str(dtype).removeprefix('torch.')}'s range (±{info.max:g}); {fix}"
        )
    return out


def _dora(wide: torch.Tensor, m: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``m ⊙ wide / ‖wide‖`` per output row, in place, in wide's dtype (rows: dim 0, or dim 1 when
    ``transposed``: GPT-2's Conv1D stores (in, out)). A zero row norm gives Inf, refused by the caller."""
    dim = 0 if transposed else 1
    norm = torch.linalg.vector_norm(wide, dim=dim, keepdim=True)  # (out, 1) or (1, out)
    factor = m.to(wide.dtype).reshape(norm.shape) / norm
    return wide.mul_(factor)


def merge_state_dict(
    state: dict[str, torch.Tensor],
    adapters: list[Adapter],
    weights: list[float] | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], MergeStats]:
    """Return a new state dict with every adapter merged in; ``state`` is not modified.

    Args:
        state: base weights, keyed ``<module path>.weight``.
        adapters: one or more adapters; they may differ in rank and targets.
        weights: ``wᵢ`` per adapter (default 1.0 each).
        compute_dtype: float32 or float64; the sum is formed in it.
        storage_dtype: dtype of the merged weights (default: each base weight's own dtype).

    Raises:
        AdapterMismatchError: an adapted module has no weight in ``state`` or does not fit it.
        AdapterFormatError: the merged weight would hold NaN or Inf.
    """
    if compute_dtype not in WIDE_DTYPES:
        raise ValueError(f"merge must compute in float32 or float64, not {compute_dtype}")
    weights = adapter_weights(len(adapters), weights)
    check_dora(adapters, weights)
    t0 = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, tuple[torch.Tensor, bool]] = {}  # DoRA: key -> (m, fan_in_fan_out)
    for adapter, w in zip(adapters, weights, strict=True):
        for path, (a, b) in adapter.weights.items():
            key = f"{path}.weight"
            if key not in state:
                raise AdapterMismatchError(f"adapter module {path!r}: base has no tensor {key!r}")
            d = delta_weight(a, b, adapter.config.scaling(path), adapter.config.fan_in_fan_out, compute_dtype)
            if w != 1.0:
                d.mul_(w)
            if d.shape != state[key].shape:
                raise AdapterMismatchError(
                    f"adapter module {path!r}: update has shape {tuple(d.shape)} but {key!r} is "
                    f"{tuple(state[key].shape)}"
                )
            deltas[key] = deltas[key].add_(d) if key in deltas else d
            if adapter.config.use_dora:
                magnitudes[key] = (adapter.magnitudes[path], adapter.config.fan_in_fan_out)
    merged = dict(state)
    replaced: dict[str, torch.Tensor] = {}
    for adapter in adapters:  # trained biases, modules_to_save: taken as they are
        for key, t in adapter.replacements.items():
            if key not in state:
                raise AdapterMismatchError(f"adapter replaces {key!r}, which the base does not have")
            if key in replaced and not torch.equal(replaced[key], t):
                raise AdapterMismatchError(f"two adapters replace {key!r} with different values")
            replaced[key] = t
            merged[key] = t.to(storage_dtype or state[key].dtype)
    stats = MergeStats(str(compute_dtype).removeprefix("torch."), "")
    for key, d in deltas.items():
        # Temporaries are few and in place: a streaming merge holds one tensor at a time, and
        # the largest weights are hundreds of MB in float64.
        w0 = state[key]
        mod = ModuleMerge(key.removesuffix(".weight"), _amax(d), _amax(w0))
        wide = d.add_(w0)  # W0 + Σ w·s·B·A in compute_dtype (d is not needed any more)
        if key in magnitudes:
            wide = _dora(wide, *magnitudes[key])
        top = _amax(wide)  # NaN or Inf anywhere makes this NaN or Inf: the finiteness check
        if not math.isfinite(top):
            raise AdapterFormatError(f"merging into {key!r} gives NaN or Inf; refusing to write it")
        out_dtype = storage_dtype or w0.dtype
        stored = cast_checked(wide, out_dtype, key)
        if out_dtype not in WIDE_DTYPES or compute_dtype == torch.float64 and out_dtype == torch.float32:
            mod.cast_max_abs_err = _amax(wide.sub_(stored))  # what the one final cast changed
            mod.cast_max_rel_err = mod.cast_max_abs_err / max(top, 1e-30)
        del wide, d
        merged[key] = stored
        stats.modules.append(mod)
    if storage_dtype is not None:
        cast: dict[tuple, torch.Tensor] = {}  # tied tensors (one storage, several names) stay one
        for key, t in merged.items():
            if t.is_floating_point() and t.dtype != storage_dtype:
                alias = (t.data_ptr(), t.shape, t.stride(), t.dtype)
                if alias not in cast:
                    cast[alias] = cast_checked(t, storage_dtype, key)
                merged[key] = cast[alias]
    stats.storage_dtype = str(storage_dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    stats.seconds = time.perf_counter() - t0
    return merged, stats
