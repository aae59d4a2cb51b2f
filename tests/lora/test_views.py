"""Merged and unmerged views share the base's tensors and compute what a full copy computes."""

from __future__ import annotations

import copy

import pytest
import torch
from artifacts import make_adapter

from loraexport.lora.adapter import Adapter
from loraexport.lora.layer import WeightedLoRALinear
from loraexport.models.reference import load_model
from loraexport.stages.merge import merged_model, unmerged_model

WEIGHTS = [0.7, 0.3]


@pytest.fixture(scope="module")
def two_adapters(seq2seq_base, seq2seq_adapter, tmp_path_factory):
    # a second adapter with another rank and other targets (q is shared with the first)
    other = make_adapter(
        seq2seq_base,
        tmp_path_factory.mktemp("second") / "a",
        seed=5,
        r=2,
        lora_alpha=3,
        target_modules=["q", "o"],
    )
    return [Adapter.load(seq2seq_adapter), Adapter.load(other)]


def _ptrs(model: torch.nn.Module) -> dict[str, int]:
    return {k: v.data_ptr() for k, v in model.state_dict().items()}


def test_views_share_untouched_tensors(seq2seq_base, two_adapters):
    base = load_model(seq2seq_base)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged, _ = merged_model(base, two_adapters, WEIGHTS)
    unmerged = unmerged_model(base, two_adapters, WEIGHTS)
    base_ptrs, merged_ptrs = _ptrs(base), _ptrs(merged)
    targeted = {f"{p}.weight" for a in two_adapters for p in a.weights}
    for k, ptr in base_ptrs.items():
        assert (merged_ptrs[k] == ptr) == (k not in targeted), k  # only the merged weights are new
    unmerged_ptrs = _ptrs(unmerged)
    for k, ptr in base_ptrs.items():
        module, _, attr = k.rpartition(".")
        name = f"{module}.base_layer.{attr}" if f"{module}.weight" in targeted else k
        assert unmerged_ptrs[name] == ptr, k  # nothing copied: LoRA branches wrap the base's layers
    # the float64 round trip parity makes on the unmerged view leaves the base exactly as it was
    unmerged.double()
    unmerged.float()
    for k, v in base.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def test_weighted_unmerged_equals_float64_sum(seq2seq_base, two_adapters, tiny_inputs):
    """The two-adapter reference, run in float64, equals the merged model run in float64.

    Both compute W0·x + Σ wᵢ·sᵢ·Bᵢ·Aᵢ·x, one factored, one with ΔW formed: in float64 they
    agree to ~1e-15 relative; 1e-10 leaves room for the sums' different orders.
    """
    base = load_model(seq2seq_base).double()  # the views keep the base's dtype: float64 here
    unmerged = unmerged_model(base, two_adapters, WEIGHTS)
    layers = [m for m in unmerged.modules() if isinstance(m, WeightedLoRALinear)]
    assert layers and all(len(m.lora_A) == 2 for m in layers)  # q carries both adapters' branches
    merged, _ = merged_model(base, two_adapters, WEIGHTS)
    with torch.no_grad():
        want, got, plain = merged(**tiny_inputs), unmerged(**tiny_inputs), base(**tiny_inputs)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-10 * scale
    assert float((plain - want).abs().max()) > 1e-2 * scale  # the adapters change the output


def test_single_adapter_view_matches_classic_apply(seq2seq_base, seq2seq_adapter, tiny_inputs):
    """One adapter at weight 1: the view is the same model ``Adapter.apply`` builds on a copy."""
    base = load_model(seq2seq_base)
    adapter = Adapter.load(seq2seq_adapter)
    view = unmerged_model(base, adapter)
    classic = adapter.apply(copy.deepcopy(base)).eval()
    with torch.no_grad():
        assert torch.equal(view(**tiny_inputs), classic(**tiny_inputs))
