"""LoRALinear against the LoRA formula computed independently in float64; merge/unmerge math."""

from __future__ import annotations

import pytest
import torch
from artifacts import random_lora_linear
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.layer import LoRALinear
from loraexport.lora.merge import delta_weight, merge_state_dict

# float32 forward vs the float64 formula, relative to the size of the summands (|x|·|W0|ᵀ + |b| +
# s·|x|·|A|ᵀ·|B|ᵀ, the standard dot-product error scale, which is robust to cancellation): a few
# ulps (eps32 ≈ 1.2e-7, ≤ 24 + 8 terms); a wrong scaling, transpose or missing bias is off by O(1).
FORWARD_REL_TOL = 1e-6
EPS32 = torch.finfo(torch.float32).eps
# merge then unmerge in float32: two roundings (the add, the subtract), each ≤ eps/2 of an
# operand, so |W0 − unmerge(merge(W0))| ≤ eps·(|W0| + |ΔW|) elementwise.
UNMERGE_ULPS = 1.0


@settings(deadline=None, max_examples=50)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 8),
    scaling=st.floats(0.01, 64.0),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_equals_lora_formula_in_float64(in_f, out_f, r, scaling, batch, seed):
    layer = random_lora_linear(in_f, out_f, r, scaling, seed)
    x = torch.randn(*batch, in_f, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        got = layer(x)
    w0 = layer.base_layer.weight.double()
    a, b = layer.lora_A.double(), layer.lora_B.double()
    bias = layer.base_layer.bias.double()
    ref = x.double() @ (w0 + scaling * b @ a).T + bias
    size = x.double().abs() @ w0.abs().T + bias.abs() + scaling * (x.double().abs() @ a.abs().T) @ b.abs().T
    assert got.shape == (*batch, out_f)
    assert got.dtype == torch.float32
    err = (got.double() - ref).abs().max().item()
    assert err <= FORWARD_REL_TOL * size.max().item(), (err, size.max().item())


@settings(deadline=None, max_examples=50)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 8),
    scaling=st.floats(0.01, 64.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_then_unmerge_returns_w0_within_float32_rounding(in_f, out_f, r, scaling, seed):
    layer = random_lora_linear(in_f, out_f, r, scaling, seed)
    w0 = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    adapter = Adapter(LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["lin"]), {"lin": (a, b)})
    state = {"lin.weight": w0, "lin.bias": layer.base_layer.bias.detach()}
    merged, stats = merge_state_dict(state, [adapter])
    assert merged["lin.weight"].dtype == torch.float32
    assert torch.equal(state["lin.weight"], w0), "merge_state_dict modified its input"
    assert merged["lin.bias"] is state["lin.bias"]
    d = delta_weight(a, b, adapter.config.scaling("lin"))  # float64
    assert torch.allclose(d, layer.delta_weight(torch.float64), rtol=1e-12, atol=0)
    unmerged = (merged["lin.weight"].double() - d).float()
    bound = UNMERGE_ULPS * EPS32 * (w0.double().abs() + d.abs())
    assert ((unmerged.double() - w0.double()).abs() <= bound).all()
    assert stats.modules_merged == 1
    assert stats.modules[0].max_abs_delta == pytest.approx(d.abs().max().item(), rel=1e-12)


def test_merged_weight_is_the_correctly_rounded_float64_sum():
    layer = random_lora_linear(12, 7, 3, 2.5, seed=3)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    adapter = Adapter(LoraConfig(r=3, lora_alpha=7.5, target_modules=["lin"]), {"lin": (a, b)})
    w0 = layer.base_layer.weight.detach()
    merged, _ = merge_state_dict({"lin.weight": w0}, [adapter])
    exact = w0.double() + 2.5 * (b.double() @ a.double())
    assert torch.equal(merged["lin.weight"], exact.float())


def test_delta_weight_fan_in_fan_out_transposes():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    plain = delta_weight(a, b, 0.5)
    fifo = delta_weight(a, b, 0.5, fan_in_fan_out=True)
    assert plain.shape == (7, 5)
    assert fifo.shape == (5, 7)
    assert torch.equal(fifo, plain.T)
    assert torch.allclose(plain, 0.5 * b.double() @ a.double(), rtol=1e-15, atol=0)


def test_merge_with_fan_in_fan_out_fits_conv1d_layout_and_refuses_linear_layout():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["c"], fan_in_fan_out=True)
    adapter = Adapter(cfg, {"c": (a, b)})
    w0 = torch.randn(5, 7, generator=g)  # GPT-2 Conv1D stores (in, out)
    merged, _ = merge_state_dict({"c.weight": w0}, [adapter])
    assert torch.equal(merged["c.weight"], (w0.double() + (b.double() @ a.double()).T).float())
    from loraexport.errors import AdapterMismatchError

    with pytest.raises(AdapterMismatchError, match="'c'"):
        merge_state_dict({"c.weight": torch.zeros(7, 5)}, [adapter])


def test_zero_b_leaves_output_exactly_the_base_output():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoRALinear(base, 3, 10.0)
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_base_frozen_and_lora_trainable():
    layer = LoRALinear(nn.Linear(6, 4), 3, 1.0)
    grads = {n: p.requires_grad for n, p in layer.named_parameters()}
    assert grads == {
        "base_layer.weight": False,
        "base_layer.bias": False,
        "lora_A": True,
        "lora_B": True,
    }
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (4, 3)
    assert (layer.in_features, layer.out_features) == (6, 4)


def test_dropout_applies_to_the_lora_branch_only():
    layer = random_lora_linear(6, 4, 2, 3.0, seed=5)
    layer.dropout = nn.Dropout(1.0)  # drop every input of the branch
    x = torch.randn(3, 6)
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
        layer.eval()
        assert not torch.equal(layer(x), layer.base_layer(x))


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), 0, 1.0)
