"""Regression tests for what fuzzing the parsers found (tests/fuzz/fuzz_parsers.py, `make fuzz`).

Each input here once escaped as a foreign exception (RecursionError, TypeError, OverflowError,
NotImplementedError, OSError, ...) or was accepted although invalid. Now each is one of
loraexport's errors, one line, naming the file and the key or tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from clihelp import one_line_message
from safetensors.torch import save_file

from loraexport.core.io import read_json, require_dir, require_file
from loraexport.errors import AdapterFormatError, InputNotFoundError, ModelFormatError
from loraexport.lora.adapter import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.stream import INDEX, checkpoint_shards, read_header

DEEP = 100_000  # nesting far past the interpreter's recursion limit
LONG_INT = "1" * 5000  # past Python's 4300-digit limit for int("...")


# ---- safetensors header --------------------------------------------------------------------
def _file(tmp_path: Path, header: dict | bytes, data: bytes = b"\x00" * 16) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype="F32", shape=(2, 2), offsets=(0, 16)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
        (b'{"w": ' + LONG_INT.encode() + b"}", "not valid JSON"),
        (b'{"w": "\xff"}', "not UTF-8"),
        ({"w": _entry(dtype=["F32"])}, "unsupported dtype"),  # was TypeError: unhashable type
        ({"w": _entry(dtype="F8_E4M3", shape=(16,))}, "unsupported dtype"),
        ({"w": _entry(shape=(None, 4))}, "shape"),  # was TypeError in the element count
        ({"w": _entry(shape=(-2, -2))}, "shape"),  # negative dims multiplied to the right size
        ({"w": _entry(shape=(True, 4))}, "shape"),
        ({"w": _entry(shape="22")}, "shape"),
        ({"w": _entry(offsets=("0", "16"))}, "data_offsets"),  # was TypeError comparing str and int
        ({"w": _entry(offsets=(0.0, 16.0))}, "data_offsets"),  # floats reached f.seek()
        ({"w": _entry(offsets=(0, 16, 32))}, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [4]}}, "malformed header entry"),
        ({"w": [1, 2]}, "malformed header entry"),
        ({"w": _entry(), "__metadata__": {"format": 1}}, "__metadata__"),
        ({"w": _entry(), "__metadata__": []}, "__metadata__"),
        ({"w": _entry(shape=(2,), offsets=(0, 8)), "x": _entry(shape=(2,), offsets=(4, 12))}, "overlaps"),
        ({"w": _entry(shape=(2,), offsets=(0, 8)), "x": _entry(shape=(1,), offsets=(12, 16))}, "gap"),
        ({"w": _entry(shape=(2,), offsets=(0, 8))}, "8 bytes after the last tensor"),
        (b'{"\\ud800": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "not valid Unicode"),
    ],
)
def test_malformed_header_is_one_model_format_error(tmp_path, header, needle):
    path = _file(tmp_path, header)
    with pytest.raises(ModelFormatError) as e:
        read_header(path)
    one_line_message(e, str(path), needle)


def test_valid_header_with_every_dtype_and_empty_tensors_is_read(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {
        "a": torch.zeros(0, 3),
        "b": torch.ones(2, dtype=torch.bfloat16),
        "c": torch.tensor(2.0, dtype=torch.float64),
        "d": torch.tensor([True]),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos, meta = read_header(path)
    assert {t.name: (t.dtype, t.shape) for t in infos} == {
        "a": ("F32", [0, 3]),
        "b": ("BF16", [2]),
        "c": ("F64", []),
        "d": ("BOOL", [1]),
    }
    assert meta == {"format": "pt"}


# ---- safetensors index ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"\xcf{}", "not UTF-8"),  # was UnicodeDecodeError
        (b"[" * DEEP, "nested too deeply"),  # was RecursionError
        (json.dumps({"weight_map": {"w": 3}}).encode(), "weight_map"),  # was TypeError in Path(3)
        (json.dumps({"weight_map": ["model.safetensors"]}).encode(), "weight_map"),
        (json.dumps({"weight_map": {"w": "x" * 5000}}).encode(), "missing or outside"),  # was OSError
        (json.dumps({"weight_map": {"w": "../model.safetensors"}}).encode(), "missing or outside"),
        (json.dumps([1]).encode(), "weight_map"),
    ],
)
def test_malformed_index_names_the_index(tmp_path, text, needle):
    (tmp_path / INDEX).write_bytes(text)
    with pytest.raises(ModelFormatError) as e:
        checkpoint_shards(tmp_path)
    one_line_message(e, INDEX, needle)


# ---- JSON files and paths ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
        (LONG_INT.encode(), "4300 digits"),  # was ValueError from int()
        (b'{"r": "\xe9"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "BOM"),
    ],
)
def test_read_json_hostile_text(tmp_path, text, needle):
    path = tmp_path / CONFIG_NAME
    path.write_bytes(text)
    with pytest.raises(AdapterFormatError) as e:
        read_json(path, AdapterFormatError)
    one_line_message(e, str(path), needle)


def test_read_json_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / CONFIG_NAME
    path.write_text("{}")

    import loraexport.core.untrusted

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # chmod does not stop root, who runs CI here: fail the open where JSON is read
    monkeypatch.setattr(loraexport.core.untrusted, "open", denied, raising=False)
    with pytest.raises(AdapterFormatError) as e:
        read_json(path, AdapterFormatError)
    one_line_message(e, str(path), "Permission denied")


@pytest.mark.parametrize("require", [require_dir, require_file])
def test_path_name_too_long_is_input_not_found(tmp_path, require):
    with pytest.raises(InputNotFoundError) as e:
        require(tmp_path / ("x" * 300), "adapter directory")  # was OSError: File name too long
    one_line_message(e, "adapter directory", "too long")


# ---- adapter_config.json -------------------------------------------------------------------
def _config(**overrides) -> dict:
    d = LoraConfig(r=4, lora_alpha=8).to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (dict(target_modules="a{99999999999}"), "target_modules"),  # was OverflowError from re
        (dict(target_modules="(" * 1000 + ")" * 1000), "target_modules"),  # under the length cap
        (dict(rank_pattern={"(q": 2}), "rank_pattern"),  # was re.error at rank() time
        (dict(alpha_pattern={"q{99999999999}": 2}), "alpha_pattern"),
        (dict(layers_pattern="(layers"), "layers_pattern"),  # was re.error at matches() time
        (dict(layers_pattern=[3]), "layers_pattern"),  # was TypeError at matches() time
        (dict(exclude_modules=["q", None]), "exclude_modules"),  # was TypeError at matches() time
        (dict(exclude_modules="[z-a]"), "exclude_modules"),
        (dict(layers_to_transform="0"), "layers_to_transform"),
        (dict(layers_to_transform=[0, -1]), "layers_to_transform"),
        (dict(lora_alpha=math.nan), "lora_alpha"),  # a NaN scaling merged NaN into every weight
        (dict(lora_alpha=math.inf), "lora_alpha"),
        (dict(lora_alpha=10**400), "lora_alpha"),  # was OverflowError at scaling() time
        (dict(alpha_pattern={"q": math.inf}), "alpha_pattern"),
        (dict(r=2**40), "'r'"),  # alpha/sqrt(r) with rsLoRA overflowed for r past 2**1024
        (dict(rank_pattern={"q": 10**400}), "rank_pattern"),
        (dict(use_rslora="false"), "use_rslora"),  # a truthy string silently switched rsLoRA on
        (dict(fan_in_fan_out=1), "fan_in_fan_out"),
        (dict(task_type=["CAUSAL_LM"]), "task_type"),
        (dict(bias=["none"]), "bias"),
    ],
)
def test_bad_config_values_refused_by_key(overrides, key):
    with pytest.raises(AdapterFormatError) as e:
        LoraConfig.from_dict(_config(**overrides))
    one_line_message(e, CONFIG_NAME, key)


def test_long_values_are_quoted_short():
    with pytest.raises(AdapterFormatError) as e:
        LoraConfig.from_dict(_config(r=[[[[[[1]]]]]] * 1000))
    assert len(str(e.value)) < 200, str(e.value)


@pytest.mark.parametrize("value", [None, [], "layers"])
def test_optional_patterns_accept_peft_values(value):
    config = LoraConfig.from_dict(_config(layers_pattern=value, exclude_modules=value or None))
    assert config.matches("layers.0.q") in (True, False)


# ---- adapter tensors -----------------------------------------------------------------------
@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps(_config(r=2, lora_alpha=4, target_modules=["q"])))
    return d


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        f"{PREFIX}q.lora_A.weight": torch.ones(2, 3).to(dtype),
        f"{PREFIX}q.lora_B.weight": torch.ones(4, 2).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_adapter_checked_for_non_finite_values(adapter_dir, dtype):
    tensors = _tensors(dtype)
    save_file(tensors, str(adapter_dir / WEIGHTS_NAME))
    assert Adapter.load(adapter_dir).weights["q"][0].dtype == dtype  # finite: loads
    bad = torch.ones(4, 2)
    bad[1, 1] = math.nan  # float8_e4m3fn has no Inf; NaN is in every float8 format
    tensors[f"{PREFIX}q.lora_B.weight"] = bad.to(dtype)
    save_file(tensors, str(adapter_dir / WEIGHTS_NAME))
    with pytest.raises(AdapterFormatError) as e:  # was NotImplementedError from torch.isfinite
        Adapter.load(adapter_dir)
    one_line_message(e, f"'{PREFIX}q.lora_B.weight'", "NaN or Inf")


def test_pickle_with_non_string_keys_refused(adapter_dir):
    torch.save({i: t for i, t in enumerate(_tensors(torch.float32).values())}, adapter_dir / PICKLE_NAME)
    with pytest.raises(AdapterFormatError) as e:  # was TypeError from the key regex
        Adapter.load(adapter_dir, allow_pickle=True)
    one_line_message(e, PICKLE_NAME, "dict of tensors by name")


class Payload:
    """Not a tensor: the weights-only unpickler refuses it."""


def test_pickle_refused_by_weights_only_is_one_line_without_advice_to_disable_it(adapter_dir):
    torch.save({"x": Payload()}, adapter_dir / PICKLE_NAME)
    with pytest.raises(AdapterFormatError) as e:
        Adapter.load(adapter_dir, allow_pickle=True)
    one_line_message(e, PICKLE_NAME, "weights_only=True", "something other than tensors")
    assert "False" not in str(e.value)  # torch's own message suggests weights_only=False


@pytest.mark.parametrize("content", [b"\0" * 1024, b"PK\3\4" + b"\0" * 60], ids=["legacy-tar", "broken-zip"])
def test_an_unreadable_pickle_is_one_line_without_advice_to_disable_weights_only(adapter_dir, content):
    """Neighbours of the one above: torch's legacy-format failure advises weights_only=False
    mid-line; the line is cut before the advice."""
    (adapter_dir / PICKLE_NAME).write_bytes(content)
    with pytest.raises(AdapterFormatError) as e:
        Adapter.load(adapter_dir, allow_pickle=True)
    one_line_message(e, PICKLE_NAME)
    assert "False" not in str(e.value) and "Re-running" not in str(e.value), str(e.value)


def test_complex_replacement_tensor_refused(tmp_path):
    """A trained bias stored as complex64 would lose its imaginary part in the merge's cast."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps(_config(r=2, lora_alpha=4, target_modules=["q"], bias="all")))
    tensors = _tensors(torch.float32) | {f"{PREFIX}q.base_layer.bias": torch.ones(4, dtype=torch.complex64)}
    save_file(tensors, str(d / WEIGHTS_NAME))
    with pytest.raises(AdapterFormatError) as e:  # was a UserWarning from the merge, and a wrong bias
        Adapter.load(d)
    one_line_message(e, f"'{PREFIX}q.bias'", "complex")
