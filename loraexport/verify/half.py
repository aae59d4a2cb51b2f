"""What storing the merged weights in float16/bfloat16 costs, measured in PyTorch.

Three models are compared with the unmerged float32 model on the parity cases and the
generation prompts:
  * ``merged``: W0 + s·B·A computed in float64, stored in the half dtype (what `merge --dtype`
    and `export --dtype` write), computed in float32;
  * ``base_only``: the base weights stored in the half dtype with the LoRA branches kept in
    float32 — the cost of the dtype alone;
  * ``no_adapter``: the float32 base without the adapter — how far the adapter moves outputs.
The difference between the first two is what merging into half precision adds; the third
scales it: ``adapter_retained = 1 − rms(merged − unmerged) / rms(base − unmerged)`` is the
share of the adapter's effect on the outputs that survives the rounding (1: all of it; 0 or
less: the rounding moved outputs as far as dropping the adapter would).

Informational for ``verify --half``. For an export whose file stores half weights
(``--dtype``), an adapter that does not survive (``adapter_retained < MIN_ADAPTER_RETAINED``)
fails verification: the file would be exact against its rounded weights and still useless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loraexport.core.dtypes import TORCH
from loraexport.core.enums import Precision
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import merge_state_dict
from loraexport.lora.views import merged_view, set_tensor, shared_copy
from loraexport.models.base import ModelFamily
from loraexport.verify.gates import MIN_ADAPTER_RETAINED  # noqa: F401 (the rule lives with the gates)


@dataclass
class HalfCost:
    dtype: str
    variant: str  # "merged" | "base_only" | "no_adapter"
    max_abs_err: float  # logits (or first output) vs unmerged float32, unmasked positions
    top1_agreement: float | None
    generation_agreement: float | None
    max_cast_rel_err: float | None = None  # merged only: largest relative error of the final cast
    rms_err: float = 0.0  # root mean square of the same differences
    adapter_retained: float | None = None  # merged only: see the module docstring


def _rounded(
    state: dict[str, torch.Tensor], dtype: torch.dtype, skip: str = "lora_"
) -> dict[str, torch.Tensor]:
    """Floating tensors rounded to ``dtype`` and back (exact upcast), LoRA tensors untouched;
    tied tensors (one storage under several names) stay one tensor."""
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple, torch.Tensor] = {}
    for k, v in state.items():
        if not v.is_floating_point() or skip in k:
            out[k] = v
            continue
        alias = (v.data_ptr(), v.shape, v.stride(), v.dtype)
        if alias not in done:
            done[alias] = v.to(dtype).to(v.dtype)
        out[k] = done[alias]
    return out


@torch.no_grad()
def _compare(
    family: ModelFamily,
    model: nn.Module,
    reference: nn.Module,
    seed: int,
    samples: int,
    sources: list[str] | None,
    tokenizer: Any | None,
) -> tuple[float, float | None, float | None]:
    err, agree, total, sq, n = 0.0, 0, 0, 0.0, 0
    for case in family.parity_cases(reference, samples, seed):
        want, got = reference(**case.inputs), model(**case.inputs)
        want = getattr(want, "logits", getattr(want, "last_hidden_state", want))
        got = getattr(got, "logits", getattr(got, "last_hidden_state", got))
        valid = (
            case.valid if want.shape[:2] == case.valid.shape else torch.ones(want.shape[:2], dtype=torch.bool)
        )
        diff = (got - want)[valid].double()
        err = max(err, float(diff.abs().max()))
        sq, n = sq + float((diff**2).sum()), n + diff.numel()
        agree += int((got.argmax(-1) == want.argmax(-1))[valid].sum())
        total += int(valid.sum())
    top1 = agree / total if total else None
    gen_rows = gen_same = 0
    for inputs, max_new in family.prompts(reference, tokenizer, sources, 16, seed):
        a, b = family.generate(reference, inputs, max_new), family.generate(model, inputs, max_new)
        gen_rows += a.shape[0]
        gen_same += int((a == b).all(dim=1).sum())
    return err, top1, (gen_same / gen_rows if gen_rows else None), (sq / n) ** 0.5 if n else 0.0


def half_precision_costs(
    family: ModelFamily,
    base: nn.Module,
    adapters: list[Adapter],
    weights: list[float] | None,
    unmerged: nn.Module,
    dtype: str,
    *,
    merged: nn.Module | None = None,
    max_cast_rel_err: float | None = None,
    seed: int = 0,
    samples: int = 6,
    sources: list[str] | None = None,
    tokenizer: Any | None = None,
) -> list[HalfCost]:
    """The three comparisons of the module docstring, for ``dtype``; ``tokenizer`` (the
    base's, or None) makes the generation prompts of ``sources``.

    ``merged``: the merged model already rounded to ``dtype`` (``merged_model(...,
    storage_dtype=...)``), when the caller holds it; else it is built here. One rounded copy
    of the weights exists at a time.
    """
    torch_dtype = TORCH[Precision.parse(dtype)]
    if merged is None:
        state = base.state_dict()
        merged_state, stats = merge_state_dict(state, adapters, weights, storage_dtype=torch_dtype)
        merged = merged_view(base, state, merged_state)  # upcast exactly to the base's float32
        del merged_state, state
        max_cast_rel_err = max((m.cast_max_rel_err for m in stats.modules), default=0.0)
    err, top1, gen, rms = _compare(family, merged.eval(), unmerged, seed, samples, sources, tokenizer)
    rows = [HalfCost(dtype, "merged", err, top1, gen, max_cast_rel_err, rms)]
    del merged  # this function's reference only; the rounded base below takes its place
    base_only = shared_copy(unmerged)
    unmerged_state = unmerged.state_dict()
    made: dict = {}
    for name, t in _rounded(unmerged_state, torch_dtype).items():
        if t is not unmerged_state[name]:
            set_tensor(base_only, name, t, made)
    del unmerged_state, made
    err, top1, gen, rms = _compare(family, base_only.eval(), unmerged, seed, samples, sources, tokenizer)
    rows.append(HalfCost(dtype, "base_only", err, top1, gen, None, rms))
    del base_only
    err, top1, gen, rms = _compare(family, base.eval(), unmerged, seed, samples, sources, tokenizer)
    rows.append(HalfCost(dtype, "no_adapter", err, top1, gen, None, rms))
    if rms > 0:
        rows[0].adapter_retained = 1.0 - rows[0].rms_err / rms
    return rows
