"""``dtypes.py``: every ``Precision`` as a torch and an ONNX element type, the same width."""

from __future__ import annotations

import onnx
import pytest
import torch

from loraexport.core.dtypes import ONNX, TORCH, torch_dtype
from loraexport.core.enums import Precision
from loraexport.errors import InvalidInputError

FLOATS = [p for p in Precision if not p.is_quantized]  # a quantized graph has no one element type


def test_every_float_precision_has_a_torch_and_an_onnx_type():
    assert set(TORCH) == set(ONNX) == set(FLOATS)


@pytest.mark.parametrize("precision", FLOATS)
def test_torch_and_onnx_types_agree(precision):
    t, o = TORCH[precision], ONNX[precision]
    assert onnx.TensorProto.DataType.Name(o) == precision.value.upper().replace("FLOAT32", "FLOAT")
    assert str(t) == f"torch.{precision.value}"
    assert torch.empty(0, dtype=t).element_size() == onnx.helper.tensor_dtype_to_np_dtype(o).itemsize


@pytest.mark.parametrize(
    "value, expected",
    [(None, None), ("float32", torch.float32), ("float16", torch.float16)]
    + [(Precision.BFLOAT16, torch.bfloat16)],
)
def test_torch_dtype(value, expected):
    assert torch_dtype(value) is expected


def test_torch_dtype_refuses_an_unknown_name():
    with pytest.raises(InvalidInputError, match="unknown dtype 'float64'"):
        torch_dtype("float64")
    with pytest.raises(InvalidInputError, match="int8 is a quantization"):
        torch_dtype("int8")
