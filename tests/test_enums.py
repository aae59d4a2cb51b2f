"""``enums.py``: the export modes and storage precisions every stage, the CLI and
``loraexport.json`` share, and how a value given by a user is parsed."""

from __future__ import annotations

import json

import pytest

from loraexport.core.enums import ExportMode, Precision, half_precision, quantization
from loraexport.errors import InvalidInputError


def test_export_modes_a_user_may_ask_for():
    assert ExportMode.choices() == [
        "merged",
        "unmerged",
        "adapter",
    ]  # base: what an export without adapters is
    assert [m.value for m in ExportMode] == ["merged", "unmerged", "adapter", "base"]


@pytest.mark.parametrize("value", ["merged", "unmerged", "base", ExportMode.UNMERGED])
def test_export_mode_parse(value):
    assert ExportMode.parse(value) is ExportMode(value)


@pytest.mark.parametrize("value", ["Merged", "", None, 1])
def test_export_mode_parse_refuses_with_the_choices(value):
    with pytest.raises(InvalidInputError) as e:
        ExportMode.parse(value)
    assert str(e.value) == f"mode must be one of merged, unmerged, adapter, got {value!r}"


def test_precisions():
    assert Precision.choices() == ["float32", "float16", "bfloat16"]
    assert Precision.choices(half_only=True) == ["float16", "bfloat16"]
    assert [p.is_half for p in Precision] == [False, True, True, False, False, False]


@pytest.mark.parametrize("value", ["float32", "float16", "bfloat16", Precision.BFLOAT16])
def test_precision_parse(value):
    assert Precision.parse(value) is Precision(value)


@pytest.mark.parametrize("value", ["float64", "fp16", "", None])
def test_precision_parse_refuses_with_the_choices(value):
    with pytest.raises(InvalidInputError) as e:
        Precision.parse(value)
    choices = "float32, float16, bfloat16, int8, int8-dynamic, int4"
    assert str(e.value) == f"unknown dtype {value!r}; choose from {choices}"


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("float32", None), (Precision.FLOAT32, None), ("float16", Precision.FLOAT16)]
    + [("bfloat16", Precision.BFLOAT16)],
)
def test_half_precision_is_none_unless_weights_are_rounded(value, expected):
    assert half_precision(value) is expected


def test_half_precision_refuses_an_unknown_dtype():
    with pytest.raises(InvalidInputError, match="unknown dtype 'int3'"):
        half_precision("int3")
    assert half_precision("int8") is None  # a quantization is no half precision


def test_quantizations():
    assert Precision.choices("quantized") == ["int8", "int8-dynamic", "int4"]
    assert Precision.choices() == ["float32", "float16", "bfloat16"]  # --dtype's choices
    assert quantization("int4") is Precision.INT4 and quantization("float16") is None
    assert quantization(None) is None and Precision.INT8.is_quantized and not Precision.INT8.is_half


def test_values_are_strings_in_json_and_comparisons():
    """loraexport.json and report.json hold the values themselves."""
    assert json.dumps({"mode": ExportMode.MERGED, "dtype": Precision.FLOAT16}) == (
        '{"mode": "merged", "dtype": "float16"}'
    )
    assert ExportMode.BASE == "base" and Precision.BFLOAT16 == "bfloat16"
