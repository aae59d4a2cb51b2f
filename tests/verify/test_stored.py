"""``verify.stored``: the merged model's weights against a second computation of the merge, and
the noise floor that counts the file's own rounded weights (and only then)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.merge import merge_state_dict
from loraexport.lora.views import merged_view, unmerged_view
from loraexport.verify.parity import compare_outputs
from loraexport.verify.stored import STORED_EPS, stored_weights_error


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.v = nn.Linear(12, 12), nn.Linear(12, 8)


def _adapter(seed: int, dora: bool = False, alpha: float = 6.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (12, 12), "v": (8, 12)}
    weights = {
        p: (torch.randn(3, i, generator=g), torch.randn(o, 3, generator=g)) for p, (o, i) in shapes.items()
    }
    mags = {p: 1 + torch.rand(o, generator=g) for p, (o, _) in shapes.items()} if dora else {}
    cfg = LoraConfig(r=3, lora_alpha=alpha, target_modules=["q", "v"], use_dora=dora)
    return Adapter(cfg, weights, magnitudes=mags)


def _models(adapters, weights=None):
    torch.manual_seed(0)
    base = _Net()
    state = base.state_dict()
    merged_state, _ = merge_state_dict(state, adapters, weights)
    return unmerged_view(base, adapters, weights), merged_view(base, state, merged_state)


@pytest.mark.parametrize(
    "adapters, weights",
    [([_adapter(1)], None), ([_adapter(1, dora=True)], None), ([_adapter(1), _adapter(2)], [0.7, -0.3])],
    ids=["lora", "dora", "two-weighted"],
)
def test_a_correct_merge_is_within_one_rounding(adapters, weights):
    unmerged, merged = _models(adapters, weights)
    assert stored_weights_error(unmerged, merged) <= STORED_EPS


def test_a_lost_module_or_a_wrong_scale_is_far_outside():
    unmerged, merged = _models([_adapter(1)])
    lost = copy.deepcopy(merged)
    with torch.no_grad():
        lost.v.weight.copy_(unmerged.v.base_layer.weight)
    assert stored_weights_error(unmerged, lost) > 1e4
    _, wrong = _models([_adapter(1, alpha=6.1)])  # scaling 2.033 instead of 2
    assert stored_weights_error(unmerged, wrong) > 1e3
    _, plain = _models([_adapter(1)])  # DoRA's magnitude dropped
    dora_unmerged, _ = _models([_adapter(1, dora=True)])
    assert stored_weights_error(dora_unmerged, plain) > 1e4


def test_stored_noise_widens_the_tolerance_and_is_reported():
    ref64 = np.zeros((1, 3, 4))
    ref32 = ref64 + 1e-6
    stored32 = ref64 + 1e-4  # the file's own weights move the output more than float32 arithmetic
    onnx = ref64 + 5e-4
    without = compare_outputs("model.logits", ref32, ref64, onnx, None)
    assert not without.passed and without.stored_err_vs_fp64 is None
    counted = compare_outputs("model.logits", ref32, ref64, onnx, None, stored32=stored32)
    assert counted.passed and counted.stored_err_vs_fp64 == pytest.approx(1e-4)
    assert counted.tolerance == pytest.approx(10 * 1e-4)
    planted = compare_outputs("model.logits", ref32, ref64, ref64 + 2e-3, None, stored32=stored32)
    assert not planted.passed  # beyond 10x the stored weights' own noise
