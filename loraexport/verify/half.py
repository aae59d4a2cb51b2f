"""What storing the merged weights in float16/bfloat16 costs, measured in PyTorch.

Two models are compared with the unmerged float32 model on the parity cases and the
generation prompts:
  * ``merged``: W0 + s·B·A computed in float64, stored in the half dtype (what `merge --dtype`
    writes), computed in float32;
  * ``base_only``: the base weights stored in the half dtype with the LoRA branches kept in
    float32 — the cost of the dtype alone.
The difference between the two is what merging into half precision adds. Informational: it
does not decide ``passed`` (half precision is a choice, not an export error).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import merge_state_dict
from loraexport.lora.views import merged_view, set_tensor, shared_copy
from loraexport.models.base import ModelFamily

HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class HalfCost:
    dtype: str
    variant: str  # "merged" | "base_only"
    max_abs_err: float  # logits (or first output) vs unmerged float32, unmasked positions
    top1_agreement: float | None
    generation_agreement: float | None
    max_cast_rel_err: float | None = None  # merged only: largest relative error of the final cast


def _rounded(
    state: dict[str, torch.Tensor], dtype: torch.dtype, skip: str = "lora_"
) -> dict[str, torch.Tensor]:
    """Floating tensors rounded to ``dtype`` and back (exact upcast), LoRA tensors untouched."""
    return {
        k: (v.to(dtype).to(v.dtype) if v.is_floating_point() and skip not in k else v)
        for k, v in state.items()
    }


@torch.no_grad()
def _compare(
    family: ModelFamily,
    model: nn.Module,
    reference: nn.Module,
    seed: int,
    samples: int,
    sources: list[str] | None,
) -> tuple[float, float | None, float | None]:
    err, agree, total = 0.0, 0, 0
    for case in family.parity_cases(reference, samples, seed):
        want, got = reference(**case.inputs), model(**case.inputs)
        want = getattr(want, "logits", getattr(want, "last_hidden_state", want))
        got = getattr(got, "logits", getattr(got, "last_hidden_state", got))
        valid = (
            case.valid if want.shape[:2] == case.valid.shape else torch.ones(want.shape[:2], dtype=torch.bool)
        )
        err = max(err, float((got - want)[valid].abs().max()))
        agree += int((got.argmax(-1) == want.argmax(-1))[valid].sum())
        total += int(valid.sum())
    top1 = agree / total if total else None
    gen_rows = gen_same = 0
    for inputs, max_new in family.prompts(reference, sources, 16, seed):
        a, b = family.generate(reference, inputs, max_new), family.generate(model, inputs, max_new)
        gen_rows += a.shape[0]
        gen_same += int((a == b).all(dim=1).sum())
    return err, top1, (gen_same / gen_rows if gen_rows else None)


def half_precision_costs(
    family: ModelFamily,
    base: nn.Module,
    adapters: list[Adapter],
    weights: list[float] | None,
    unmerged: nn.Module,
    dtype: str,
    *,
    seed: int = 0,
    samples: int = 6,
    sources: list[str] | None = None,
) -> list[HalfCost]:
    torch_dtype = HALF[dtype]
    state = base.state_dict()
    merged_state, stats = merge_state_dict(state, adapters, weights, storage_dtype=torch_dtype)
    merged = merged_view(base, state, merged_state)  # upcast exactly to the base's float32
    del merged_state
    base_only = shared_copy(unmerged)
    unmerged_state = unmerged.state_dict()
    for name, t in _rounded(unmerged_state, torch_dtype).items():
        if t is not unmerged_state[name]:
            set_tensor(base_only, name, t)
    out = []
    for variant, model in (("merged", merged.eval()), ("base_only", base_only.eval())):
        err, top1, gen = _compare(family, model, unmerged, seed, samples, sources)
        cast = max((m.cast_max_rel_err for m in stats.modules), default=0.0) if variant == "merged" else None
        out.append(HalfCost(dtype, variant, err, top1, gen, cast))
    return out
