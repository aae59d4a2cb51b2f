"""The merge math against float64 references, and merged == unmerged on a plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loraexport.errors import AdapterFormatError
from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.merge import delta_weight, merge_state_dict
from loraexport.models.reference import load_model
from loraexport.stages.merge import merged_model, unmerged_model

# float64 merge then one cast to float32: the stored weight is the correctly rounded sum,
# so it differs from the float64 reference by at most half a float32 ulp (2^-24 relative).
REL_TOL_F32_ROUNDING = 2.0**-24 * 1.01
# merged vs unmerged forward in float32: the two evaluate the same sums in another order;
# a few float32 roundings through 3 layers of width 16 stay far below 1e-5.
FORWARD_ATOL = 1e-5
# The adapter's effect: with B ~ N(0, 0.3) the logits move by O(0.1); 1e-3 is far above noise.
ADAPTER_EFFECT_MIN = 1e-3


def _adapter(shapes: dict[str, tuple[int, int]], r: int, alpha: float, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    weights = {
        p: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for p, (o, i) in shapes.items()
    }
    return Adapter(
        LoraConfig(r=r, lora_alpha=alpha, target_modules=[p.rsplit(".", 1)[-1] for p in shapes]),
        weights,
    )


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 24),
    in_f=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    w=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_two_adapters_equal_float64_reference(out_f, in_f, r, alpha, w, seed):
    g = torch.Generator().manual_seed(seed)
    state = {
        "m.q.weight": torch.randn(out_f, in_f, generator=g),
        "m.q.bias": torch.randn(out_f, generator=g),
    }
    a1 = _adapter({"m.q": (out_f, in_f)}, r, alpha, seed + 1)
    a2 = _adapter({"m.q": (out_f, in_f)}, r + 1, alpha / 2, seed + 2)  # another rank and scaling
    merged, stats = merge_state_dict(state, [a1, a2], [w, 1 - w])
    ref = state["m.q.weight"].double()
    for a, wi in ((a1, w), (a2, 1 - w)):
        A, B = a.weights["m.q"]
        ref = ref + wi * a.config.scaling("m.q") * (B.double() @ A.double())
    err = (merged["m.q.weight"].double() - ref).abs().max() / ref.abs().max()
    assert err <= REL_TOL_F32_ROUNDING
    assert torch.equal(merged["m.q.bias"], state["m.q.bias"])
    assert stats.modules_merged == 1 and stats.compute_dtype == "float64"


def test_merge_is_pure_and_refuses_non_finite():
    state = {"q.weight": torch.randn(4, 3)}
    before = state["q.weight"].clone()
    a = _adapter({"q": (4, 3)}, 2, 4.0, 0)
    merge_state_dict(state, [a])
    assert torch.equal(state["q.weight"], before)  # the input state dict is not modified
    a.weights["q"] = (a.weights["q"][0] * 1e30, a.weights["q"][1] * 1e30)
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        merge_state_dict(state, [a], compute_dtype=torch.float32)


def test_fan_in_fan_out_transposes():
    A, B = torch.randn(2, 3), torch.randn(5, 2)
    assert torch.equal(delta_weight(A, B, 1.5, fan_in_fan_out=True), delta_weight(A, B, 1.5).T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_records_cast_error(dtype):
    g = torch.Generator().manual_seed(0)
    state = {"q.weight": torch.randn(8, 8, generator=g)}
    merged, stats = merge_state_dict(state, [_adapter({"q": (8, 8)}, 2, 2.0, 3)], storage_dtype=dtype)
    assert merged["q.weight"].dtype == dtype
    wide, _ = merge_state_dict(state, [_adapter({"q": (8, 8)}, 2, 2.0, 3)])
    true_err = float((merged["q.weight"].double() - wide["q.weight"].double()).abs().max())
    mod = stats.modules[0]
    assert mod.cast_max_abs_err > 0
    # recorded against the float64 sum; the float32 copy differs by < 1 float32 ulp
    assert mod.cast_max_abs_err == pytest.approx(true_err, rel=1e-3)
    assert stats.storage_dtype == str(dtype).removeprefix("torch.")


def test_merged_plain_model_equals_unmerged(seq2seq_base, seq2seq_adapter, tiny_inputs):
    base = load_model(seq2seq_base)
    adapter = Adapter.load(seq2seq_adapter)
    unmerged = unmerged_model(base, adapter)
    merged, stats = merged_model(base, [adapter])
    assert stats.modules_merged == len(adapter.weights)
    plain = load_model(seq2seq_base)  # a plain model (no LoRA modules), loaded strictly
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        want, got, orig = unmerged(**tiny_inputs), plain(**tiny_inputs), base(**tiny_inputs)
    assert (got - want).abs().max() <= FORWARD_ATOL
    assert (orig - want).abs().max() >= ADAPTER_EFFECT_MIN  # the adapter did something


def test_merging_twice_from_the_base_is_identical(seq2seq_base, seq2seq_adapter):
    base = load_model(seq2seq_base)
    adapter = Adapter.load(seq2seq_adapter)
    m1, _ = merged_model(base, [adapter])
    m2, _ = merged_model(copy.deepcopy(base), [adapter])
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2), k


@pytest.mark.parametrize(
    "value, dtype, advice",
    [
        (1e5, torch.float16, "store it in bfloat16 or float32"),
        (1e300, torch.float32, "no floating-point format a model stores holds it"),  # bfloat16 would not
        (1e300, torch.bfloat16, "no floating-point format a model stores holds it"),
    ],
)
def test_a_cast_beyond_the_range_says_what_would_hold_it(value, dtype, advice):
    from loraexport.errors import InvalidInputError
    from loraexport.lora.merge import cast_checked

    with pytest.raises(InvalidInputError, match=advice) as e:
        cast_checked(torch.tensor([value], dtype=torch.float64), dtype, "w")
    assert "\n" not in str(e.value)
