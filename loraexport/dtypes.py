"""``Precision`` as torch and ONNX element types (``enums`` stays free of torch for the runtime
and the CLI)."""

from __future__ import annotations

import onnx
import torch

from loraexport.enums import Precision

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
    """The torch dtype of ``precision``; None for None."""
    return None if precision is None else TORCH[Precision.parse(precision)]
