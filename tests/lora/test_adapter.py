"""Adapter round trips: ours ↔ ours, ours → PEFT, PEFT → ours; tensors bit-identical."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from loraexport.lora.adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject, lora_layers, unwrap

# Our LoRALinear vs PEFT's lora.Linear on identical float32 tensors: the same sums in a possibly
# different order (x@Aᵀ vs F.linear), so a few ulps of the logits' scale; a missing or mis-scaled
# branch changes the logits by O(0.1) here (B ~ N(0, 0.5²)).
PEFT_OUTPUT_REL_TOL = 1e-6

CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q", "v"]),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q", "v", "fc1"],
        rank_pattern={"cross_attn.v": 2, "fc1": 3},
        alpha_pattern={"q": 5},
    ),
    "rslora-regex": dict(
        r=3, lora_alpha=6, use_rslora=True, target_modules=r".*decoder\.\d+\.(self_attn|ff)\.\w+"
    ),
}


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= PEFT_OUTPUT_REL_TOL * scale, (err, scale)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"])


def _base_state(model) -> dict[str, torch.Tensor]:
    """The base parameters, keyed as in the unwrapped model (PEFT's ``.base_layer`` removed)."""
    return {
        k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "lora_" not in k
    }


def _ours_trained(make_model, randomize_b, kwargs: dict) -> tuple[torch.nn.Module, Adapter]:
    model = make_model(n_decoder_layers=2)
    config = LoraConfig(**kwargs)
    inject(model, config)
    randomize_b(model)
    return model, Adapter.from_model(model, config)


def _peft_lora_weights(pm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n.removeprefix(PREFIX): (m.lora_A["default"].weight, m.lora_B["default"].weight)
        for n, m in pm.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.lora_A
    }


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_save_ours_load_bit_identical(name, tmp_path, make_model, randomize_b):
    _, adapter = _ours_trained(make_model, randomize_b, CONFIGS[name])
    adapter.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = Adapter.load(tmp_path)
    assert loaded.config.to_dict() == adapter.config.to_dict()
    assert loaded.weights.keys() == adapter.weights.keys()
    for path, (a, b) in adapter.weights.items():
        la, lb = loaded.weights[path]
        assert torch.equal(la, a) and torch.equal(lb, b), path
        assert la.dtype == a.dtype == torch.float32
    assert any(b.abs().max() > 0 for _, b in adapter.weights.values())
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert keys == {f"{PREFIX}{p}.lora_{w}.weight" for p in adapter.weights for w in "AB"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_save_peft_load(name, tmp_path, make_model, randomize_b, tiny_inputs):
    ours, adapter = _ours_trained(make_model, randomize_b, CONFIGS[name])
    adapter.save(tmp_path)
    pm = peft.PeftModel.from_pretrained(make_model(n_decoder_layers=2), str(tmp_path))
    pm.eval()
    theirs = _peft_lora_weights(pm)
    assert theirs.keys() == adapter.weights.keys()
    for path, (a, b) in adapter.weights.items():
        assert torch.equal(theirs[path][0], a) and torch.equal(theirs[path][1], b), path
    for path, layer in lora_layers(ours).items():
        peft_layer = pm.base_model.model.get_submodule(path)
        assert peft_layer.scaling["default"] == pytest.approx(layer.scaling, rel=1e-15), path
    ref = _logits(ours, tiny_inputs)
    _close(_logits(pm, tiny_inputs), ref)
    # and the adapter matters: the base alone is far from it
    base = _logits(make_model(n_decoder_layers=2), tiny_inputs)
    assert (base - ref).abs().max() > 1e3 * PEFT_OUTPUT_REL_TOL * ref.abs().max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_save_ours_load_and_apply(name, tmp_path, make_model, randomize_b, tiny_inputs):
    kwargs = CONFIGS[name]
    pm = peft.get_peft_model(make_model(n_decoder_layers=2), peft.LoraConfig(**kwargs))
    randomize_b(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    adapter = Adapter.load(tmp_path)
    theirs = _peft_lora_weights(pm)
    assert adapter.weights.keys() == theirs.keys()
    for path, (a, b) in theirs.items():
        assert torch.equal(adapter.weights[path][0], a) and torch.equal(adapter.weights[path][1], b)
    fresh = make_model(n_decoder_layers=2)
    before = _base_state(fresh)
    adapter.apply(fresh)
    fresh.eval()
    for path, layer in lora_layers(fresh).items():
        assert layer.r == theirs[path][0].shape[0]
        assert layer.scaling == pytest.approx(pm.base_model.model.get_submodule(path).scaling["default"])
    _close(_logits(fresh, tiny_inputs), _logits(pm, tiny_inputs))
    after = _base_state(fresh)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_apply_leaves_base_bit_identical_and_only_lora_trainable(tmp_path, make_model, randomize_b):
    _, adapter = _ours_trained(make_model, randomize_b, CONFIGS["patterns"])
    model = make_model(n_decoder_layers=2)
    before = _base_state(model)
    adapter.apply(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{w}" for p in adapter.weights for w in "AB"}
    after = _base_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    for path, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_A, adapter.weights[path][0])
        assert torch.equal(layer.lora_B, adapter.weights[path][1])
    unwrap(model)
    assert not lora_layers(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_saved_config_is_json_with_peft_fields(tmp_path, make_model, randomize_b):
    _, adapter = _ours_trained(make_model, randomize_b, CONFIGS["patterns"])
    adapter.save(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["peft_type"] == "LORA" and data["use_dora"] is False
    assert data["rank_pattern"] == {"cross_attn.v": 2, "fc1": 3}
    assert adapter.num_parameters == sum(a.numel() + b.numel() for a, b in adapter.weights.values())


def test_sha256_changes_with_content(tmp_path, make_model, randomize_b):
    _, adapter = _ours_trained(make_model, randomize_b, CONFIGS["plain"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    adapter.save(tmp_path / "a")
    adapter.save(tmp_path / "b")
    a, b = Adapter.load(tmp_path / "a"), Adapter.load(tmp_path / "b")
    assert a.sha256() == b.sha256()
    path = next(iter(adapter.weights))
    adapter.weights[path][1][0, 0] += 1.0
    adapter.save(tmp_path / "b")
    assert Adapter.load(tmp_path / "b").sha256() != a.sha256()
