"""Adapter.load / check_fits / apply: every malformed adapter is an error naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from artifacts import edit_tensors, to_pickle
from safetensors.torch import save_file

from loraexport.errors import (
    AdapterFormatError,
    AdapterMismatchError,
    InputNotFoundError,
    InvalidInputError,
)
from loraexport.lora.adapter import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject, lora_layers

Q = "decoder.0.self_attn.q"
Q_B = f"{PREFIX}{Q}.lora_B.weight"
Q_A = f"{PREFIX}{Q}.lora_A.weight"


@pytest.fixture
def adapter_dir(tmp_path, make_model, randomize_b) -> Path:
    model = make_model()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    inject(model, config)
    randomize_b(model)
    d = tmp_path / "adapter"
    d.mkdir()
    Adapter.from_model(model, config).save(d)
    return d


def test_fixture_adapter_is_valid(adapter_dir, make_model):
    Adapter.load(adapter_dir).check_fits(make_model())


def test_missing_tensor_named(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.pop(Q_B))
    with pytest.raises(AdapterFormatError, match=f"'{Q_B}'"):
        Adapter.load(adapter_dir)


def test_missing_module_named_by_check_fits(adapter_dir, make_model):
    def drop(t):
        del t[Q_A], t[Q_B]

    edit_tensors(adapter_dir, drop)
    adapter = Adapter.load(adapter_dir)  # self-consistent, but a targeted module has no tensors
    with pytest.raises(AdapterFormatError, match=Q):
        adapter.check_fits(make_model())


def test_shape_not_fitting_module_named(adapter_dir, make_model):
    adapter = Adapter.load(adapter_dir)
    wider = make_model(d_model=24)
    with pytest.raises(AdapterMismatchError, match=r"adapter module '[\w.]+'.*24"):
        adapter.check_fits(wider)
    with pytest.raises(AdapterMismatchError):
        adapter.apply(wider)
    assert not lora_layers(wider), "a failed apply must leave the model unwrapped"


def test_only_out_features_wrong(adapter_dir, make_model):
    edit_tensors(adapter_dir, lambda t: t.__setitem__(Q_B, torch.ones(17, 4)))
    with pytest.raises(AdapterMismatchError, match=f"'{Q}'"):
        Adapter.load(adapter_dir).check_fits(make_model())


def test_rank_mismatch_between_a_and_b(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__(Q_B, t[Q_B][:, :3].contiguous()))
    with pytest.raises(AdapterFormatError, match=f"{Q}: rank mismatch"):
        Adapter.load(adapter_dir)


def test_rank_disagrees_with_config(adapter_dir):
    def shrink(t):
        t[Q_A], t[Q_B] = t[Q_A][:2].contiguous(), t[Q_B][:, :2].contiguous()

    edit_tensors(adapter_dir, shrink)
    with pytest.raises(AdapterFormatError, match=f"{Q}: tensors have rank 2 .* r=4"):
        Adapter.load(adapter_dir)


def test_not_a_matrix(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__(Q_A, t[Q_A].reshape(-1)))
    with pytest.raises(AdapterFormatError, match=Q):
        Adapter.load(adapter_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", [Q_A, Q_B])
def test_non_finite_value_named(adapter_dir, key, bad):
    def poison(t):
        t[key][1, 2] = bad

    edit_tensors(adapter_dir, poison)
    with pytest.raises(AdapterFormatError, match=f"'{key}' contains NaN or Inf"):
        Adapter.load(adapter_dir)


def test_integer_tensor_refused(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__(Q_A, t[Q_A].to(torch.int32)))
    with pytest.raises(AdapterFormatError, match="floating point"):
        Adapter.load(adapter_dir)


def test_unexpected_key_named(adapter_dir):
    key = f"{PREFIX}{Q}.weight"
    edit_tensors(adapter_dir, lambda t: t.__setitem__(key, torch.zeros(16, 16)))
    with pytest.raises(AdapterFormatError, match=f"unexpected tensor '{key}'"):
        Adapter.load(adapter_dir)


def test_extra_untargeted_module_named(adapter_dir, make_model):
    fc1 = "decoder.0.ff.fc1"

    def add(t):
        t[f"{PREFIX}{fc1}.lora_A.weight"] = torch.zeros(4, 16)
        t[f"{PREFIX}{fc1}.lora_B.weight"] = torch.zeros(32, 4)

    edit_tensors(adapter_dir, add)
    adapter = Adapter.load(adapter_dir)
    with pytest.raises(AdapterMismatchError, match=f"'{fc1}'"):
        adapter.check_fits(make_model())


def test_module_not_in_model_named_with_suggestion(adapter_dir, make_model):
    typo = "decoder.0.self_attn.qq"

    def rename(t):
        t[f"{PREFIX}{typo}.lora_A.weight"] = t.pop(Q_A)
        t[f"{PREFIX}{typo}.lora_B.weight"] = t.pop(Q_B)

    edit_tensors(adapter_dir, rename)
    with pytest.raises(AdapterMismatchError, match=f"'{typo}'.*did you mean '{Q}'"):
        Adapter.load(adapter_dir).check_fits(make_model())


def test_empty_weights_file(adapter_dir):
    save_file({}, str(adapter_dir / WEIGHTS_NAME))
    with pytest.raises(AdapterFormatError, match="no LoRA tensors"):
        Adapter.load(adapter_dir)


def test_corrupt_weights_file(adapter_dir):
    data = (adapter_dir / WEIGHTS_NAME).read_bytes()
    (adapter_dir / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=WEIGHTS_NAME):
        Adapter.load(adapter_dir)


def test_missing_weights_file(adapter_dir):
    (adapter_dir / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterFormatError, match=WEIGHTS_NAME):
        Adapter.load(adapter_dir)


def test_missing_config(adapter_dir):
    (adapter_dir / CONFIG_NAME).unlink()
    with pytest.raises(AdapterFormatError, match=CONFIG_NAME):
        Adapter.load(adapter_dir)


@pytest.mark.parametrize("text", ["{not json", "", "\xff"])
def test_config_not_json(adapter_dir, text):
    (adapter_dir / CONFIG_NAME).write_text(text, encoding="latin-1")
    with pytest.raises(AdapterFormatError, match=CONFIG_NAME):
        Adapter.load(adapter_dir)


def test_dora_config_without_magnitudes_refused_on_load(adapter_dir):
    data = json.loads((adapter_dir / CONFIG_NAME).read_text())
    data["use_dora"] = True
    (adapter_dir / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(InvalidInputError, match="use_dora is set.*lora_magnitude_vector.*missing"):
        Adapter.load(adapter_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(InputNotFoundError):
        Adapter.load(tmp_path / "nope")


def test_directory_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputNotFoundError):
        Adapter.load(f)


# ---- pickle -----------------------------------------------------------------------------
def test_pickle_refused_by_default(adapter_dir):
    to_pickle(adapter_dir)
    with pytest.raises(AdapterFormatError, match="--allow-pickle"):
        Adapter.load(adapter_dir)


def test_pickle_loaded_when_allowed(adapter_dir):
    tensors = to_pickle(adapter_dir)
    adapter = Adapter.load(adapter_dir, allow_pickle=True)
    assert len(adapter.weights) * 2 == len(tensors)
    for path, (a, b) in adapter.weights.items():
        assert torch.equal(a, tensors[f"{PREFIX}{path}.lora_A.weight"])
        assert torch.equal(b, tensors[f"{PREFIX}{path}.lora_B.weight"])


class _Payload:
    """Not allowed by ``weights_only``: loading it would mean running arbitrary pickle code."""

    def __init__(self) -> None:
        self.x = 1


def test_pickle_with_arbitrary_object_refused_even_when_allowed(adapter_dir):
    (adapter_dir / WEIGHTS_NAME).unlink()
    torch.save({"x": _Payload()}, adapter_dir / PICKLE_NAME)
    with pytest.raises(AdapterFormatError, match="weights_only"):
        Adapter.load(adapter_dir, allow_pickle=True)


def test_pickle_not_a_dict_of_tensors(adapter_dir):
    (adapter_dir / WEIGHTS_NAME).unlink()
    torch.save({"x": "text"}, adapter_dir / PICKLE_NAME)
    with pytest.raises(AdapterFormatError, match="dict of tensors"):
        Adapter.load(adapter_dir, allow_pickle=True)


def test_safetensors_preferred_over_pickle(adapter_dir):
    torch.save({"x": "garbage"}, adapter_dir / PICKLE_NAME)
    Adapter.load(adapter_dir)  # the .bin beside a .safetensors is ignored, never unpickled
