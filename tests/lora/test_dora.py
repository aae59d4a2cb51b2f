"""DoRA's math and format without a model: the merge against a float64 formula (hypothesis), the
layer against PEFT's (outputs and gradients, dropout included), save/load, and every refusal."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from loraexport.errors import AdapterFormatError, UnsupportedAdapterError
from loraexport.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject
from loraexport.lora.merge import merge_state_dict
from loraexport.lora.stream import stream_merge
from loraexport.lora.views import unmerged_view

peft = pytest.importorskip("peft")

# Merged rows against the float64 formula: one rounding of the float64 result to float32.
ROUND32 = torch.finfo(torch.float32).eps
# Our float32 layer vs PEFT's: the same operations, summed in another order (width ≤ 24).
LAYER_ATOL = 1e-5


class _Net(nn.Module):
    def __init__(self, in_f: int = 12, out_f: int = 10) -> None:
        super().__init__()
        self.lin = nn.Linear(in_f, out_f)
        self.other = nn.Linear(out_f, 4)

    def forward(self, x):
        return self.other(self.lin(x))


def _adapter(in_f=12, out_f=10, r=3, seed=0, fan_in_fan_out=False, m_scale=1.3) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g) * 0.3
    m = m_scale * (1 + 0.2 * torch.rand(out_f, generator=g))
    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=True, fan_in_fan_out=fan_in_fan_out
    )
    return Adapter(cfg, {"lin": (a, b)}, magnitudes={"lin": m})


def _formula(w0: torch.Tensor, adapter: Adapter, transposed: bool) -> torch.Tensor:
    """W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ per output row, in float64, in W0's layout."""
    a, b = adapter.weights["lin"]
    w = (w0.T if transposed else w0).double() + adapter.config.scaling("lin") * (b.double() @ a.double())
    out = (
        adapter.magnitudes["lin"].double().unsqueeze(1) * w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
    )
    return out.T if transposed else out


@settings(max_examples=60, deadline=None)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    transposed=st.booleans(),
)
def test_merge_equals_the_float64_formula_and_rows_have_norm_m(in_f, out_f, r, seed, transposed):
    adapter = _adapter(in_f, out_f, r, seed, fan_in_fan_out=transposed)
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    merged, stats = merge_state_dict({"lin.weight": w0}, [adapter])
    want = _formula(w0, adapter, transposed)
    got = merged["lin.weight"]
    assert got.dtype == torch.float32 and stats.modules_merged == 1
    assert float((got.double() - want).abs().max()) <= ROUND32 * float(want.abs().max())
    rows = torch.linalg.vector_norm(want, dim=0 if transposed else 1)
    torch.testing.assert_close(rows, adapter.magnitudes["lin"].double(), rtol=1e-12, atol=0)


def test_merge_in_float64_storage_is_the_formula_exactly_up_to_float64():
    adapter = _adapter()
    w0 = torch.randn(10, 12, dtype=torch.float64)
    merged, _ = merge_state_dict({"lin.weight": w0}, [adapter])
    torch.testing.assert_close(merged["lin.weight"], _formula(w0, adapter, False), rtol=1e-14, atol=1e-15)


def test_a_zero_row_norm_is_refused_not_written():
    adapter = _adapter()
    a, b = adapter.weights["lin"]
    b[0].zero_()
    w0 = torch.randn(10, 12)
    w0[0].zero_()  # W0 + ΔW has a zero row: m/0
    with pytest.raises(AdapterFormatError, match="NaN or Inf"):
        merge_state_dict({"lin.weight": w0}, [adapter])


def _peft_pair(dropout: float = 0.0, seed: int = 0):
    """PEFT's DoRA layer and ours on the same base, same A and B (B random), same m."""
    torch.manual_seed(seed)
    net = _Net()
    theirs = peft.get_peft_model(
        copy.deepcopy(net),
        peft.LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=True, lora_dropout=dropout),
    )
    ours = copy.deepcopy(net)
    inject(ours, LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=True, lora_dropout=dropout))
    lin = theirs.base_model.model.lin
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_(0, 0.3)
        lin.lora_magnitude_vector["default"].weight.mul_(1.2)
        ours.lin.lora_A.copy_(lin.lora_A["default"].weight)
        ours.lin.lora_B.copy_(lin.lora_B["default"].weight)
        ours.lin.lora_magnitude.copy_(lin.lora_magnitude_vector["default"].weight)
    return theirs, ours, lin


def test_fresh_dora_layer_starts_as_the_base_with_m_the_row_norms():
    torch.manual_seed(0)
    net = _Net()
    base_out = net(torch.ones(2, 12))
    inject(net, LoraConfig(r=3, lora_alpha=6, target_modules=["lin"], use_dora=True))
    torch.testing.assert_close(
        net.lin.lora_magnitude.detach(), torch.linalg.vector_norm(net.lin.base_layer.weight, dim=1)
    )
    torch.testing.assert_close(net(torch.ones(2, 12)), base_out, rtol=0, atol=1e-6)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"lin.lora_A", "lin.lora_B", "lin.lora_magnitude"}


def test_layer_outputs_and_gradients_equal_peft():
    theirs, ours, lin = _peft_pair()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=LAYER_ATOL)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    pairs = [
        (ours.lin.lora_A, lin.lora_A["default"].weight),
        (ours.lin.lora_B, lin.lora_B["default"].weight),
        (ours.lin.lora_magnitude, lin.lora_magnitude_vector["default"].weight),  # the norm: a constant
    ]
    for mine, peft_param in pairs:
        torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-5, atol=LAYER_ATOL)


def test_layer_with_dropout_in_training_equals_peft_under_one_seed():
    theirs, ours, _ = _peft_pair(dropout=0.3)
    theirs.train(), ours.train()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    y_theirs = theirs(x)
    torch.manual_seed(11)
    y_ours = ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=LAYER_ATOL)


def test_unmerged_view_equals_the_merged_weights_in_float64():
    torch.manual_seed(0)
    net = _Net().double()
    adapter = _adapter()
    x = torch.randn(4, 12, dtype=torch.float64)
    unmerged = unmerged_view(net, [adapter])(x)
    merged, _ = merge_state_dict(net.state_dict(), [adapter], storage_dtype=torch.float64)
    plain = copy.deepcopy(net)
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(unmerged, plain(x), rtol=1e-12, atol=1e-12)
    assert float((plain(x) - net(x)).detach().abs().max()) > 1e-3  # the adapter did something


# ---- the format -----------------------------------------------------------------------------------
def test_save_load_round_trip_and_peft_reads_it(tmp_path):
    torch.manual_seed(0)
    adapter = _adapter()
    adapter.save(tmp_path)
    again = Adapter.load(tmp_path)
    assert torch.equal(again.magnitudes["lin"], adapter.magnitudes["lin"])
    assert again.config.use_dora and again.num_parameters == 3 * 12 + 10 * 3 + 10
    net = _Net()
    model = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path))
    got = model.base_model.model.lin.lora_magnitude_vector["default"].weight
    assert torch.equal(got, adapter.magnitudes["lin"])


def _saved(tmp_path, edit=None, config=None):
    _adapter().save(tmp_path)
    if edit is not None:
        tensors = load_file(tmp_path / WEIGHTS_NAME)
        edit(tensors)
        save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    if config is not None:
        data = json.loads((tmp_path / CONFIG_NAME).read_text())
        data.update(config)
        (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    return tmp_path


KEY = f"{PREFIX}lin.lora_magnitude_vector"


@pytest.mark.parametrize(
    ("edit", "config", "needle"),
    [
        (lambda t: t.pop(KEY), None, "use_dora is set but tensor .*lora_magnitude_vector.* is missing"),
        (lambda t: t.update({KEY: torch.ones(9)}), None, r"vector of 10 \(lora_B's rows\), got .* \(9,\)"),
        (lambda t: t.update({KEY: torch.ones(10, 1)}), None, r"vector of 10"),
        (lambda t: t.update({KEY: torch.ones(10, dtype=torch.int32)}), None, "floating-point"),
        (lambda t: t[KEY].__setitem__(0, float("nan")), None, "NaN or Inf"),
        (None, {"use_dora": False}, "DoRA magnitude but adapter_config.json has use_dora=false"),
        (
            lambda t: t.update({f"{PREFIX}other.lora_magnitude_vector": torch.ones(3)}),
            None,
            "has no lora_A/lora_B beside it",
        ),
    ],
    ids=["missing", "short", "matrix", "integer", "nan", "not-dora", "orphan"],
)
def test_malformed_magnitudes_are_refused_naming_the_tensor(tmp_path, edit, config, needle):
    with pytest.raises(AdapterFormatError, match=needle):
        Adapter.load(_saved(tmp_path, edit, config))


def test_dora_is_merged_alone_and_at_weight_one():
    w0 = {"lin.weight": torch.randn(10, 12)}
    plain = Adapter(LoraConfig(r=3, lora_alpha=6, target_modules=["lin"]), {"lin": _adapter().weights["lin"]})
    with pytest.raises(UnsupportedAdapterError, match="merged alone"):
        merge_state_dict(w0, [_adapter(), plain])
    with pytest.raises(UnsupportedAdapterError, match="at weight 1 only, not 0.5"):
        merge_state_dict(w0, [_adapter()], [0.5])
    with pytest.raises(UnsupportedAdapterError, match="merged alone"):
        unmerged_view(_Net(), [_adapter(), plain])
    merge_state_dict(w0, [_adapter()], [1.0])  # weight 1 given explicitly: fine


def test_streaming_merge_bit_identical_with_a_transposed_layer(tmp_path):
    w0 = torch.randn(12, 10)  # (in, out): Conv1D's layout
    adapter = _adapter(fan_in_fan_out=True)
    (tmp_path / "base").mkdir()
    (tmp_path / "out").mkdir()
    save_file({"lin.weight": w0, "lin.bias": torch.zeros(10)}, str(tmp_path / "base" / "model.safetensors"))
    stream_merge(tmp_path / "base", [adapter], tmp_path / "out")
    got = load_file(tmp_path / "out" / "model.safetensors")["lin.weight"]
    assert torch.equal(got, merge_state_dict({"lin.weight": w0}, [adapter])[0]["lin.weight"])
