"""The float ``Precision``s as torch and ONNX element types (``enums`` stays free of torch for
the runtime and the CLI); a quantization (int8, int4) is a kind of graph, with no one type."""

from __future__ import annotations

import onnx
import torch

from loraexport.core.enums import Precision
from loraexport.errors import InvalidInputError

TORCH = {
    Precision.FLOAT32: torch.float32,
    Precision.FLOAT16: torch.float16,
    Precision.BFLOAT16: torch.bfloat16,
}
ONNX = {
    Precision.FLOAT32: onnx.TensorProto.FLOAT,
    Precision.FLOAT16: onnx.TensorProto.FLOAT16,
    Precision.BFLOAT16: onnx.TensorProto.BFLOAT16,
}


def torch_dtype(precision: Precision | str | None) -> torch.dtype | None:
    """The torch dtype of a float ``precision``; None for None. A quantization has none."""
    if precision is None:
        return None
    p = Precision.parse(precision)
    if p.is_quantized:
        raise InvalidInputError(f"{p.value} is a quantization (--quantize), not a storage dtype (--dtype)")
    return TORCH[p]
