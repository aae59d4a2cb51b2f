"""Half-stored ONNX weights (``export/half.py``): only exactly representable initializers are
stored in half precision, and the export is bit-identical to a float32 export of the rounded merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from loraexport.core.dtypes import torch_dtype
from loraexport.core.enums import ExportMode
from loraexport.export.half import SUFFIX, store_weights_half
from loraexport.export.onnx import EXTERNAL_DATA_BYTES
from loraexport.lora.adapter import Adapter
from loraexport.runtime.model import OnnxModel
from loraexport.stages.export import describe, export, export_model
from loraexport.stages.merge import merged_model

X = np.arange(32, dtype=np.float32)  # the input of the two-node graphs below


def _two_node_graph(path: Path, second: str, a: np.ndarray, b: np.ndarray, b_name: str = "b") -> Path:
    """``y = (x + a) <second> b`` as an ONNX file, a and b float32 initializers of shape (32,)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "a"], ["y0"]), helper.make_node(second, ["y0", b_name], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [32])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, b_name)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _y(path: Path) -> np.ndarray:
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})
    return y


def test_only_exactly_representable_initializers_are_converted(tmp_path):
    exact = np.array([0.5, -2.0, 1024.0, 0.0] * 8, dtype=np.float32)  # exact in float16 and bfloat16
    inexact = np.full(32, 0.1, dtype=np.float32)
    path = _two_node_graph(tmp_path / "m.onnx", "Add", exact, inexact)
    counts = store_weights_half(path, "bfloat16", EXTERNAL_DATA_BYTES)
    assert counts["converted"] == 1 and counts["kept"] == 1
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert inits[f"a{SUFFIX}"].data_type == onnx.TensorProto.BFLOAT16 and "b" in inits
    assert np.array_equal(_y(path), X + exact + inexact)  # the graph computes exactly what it did


@pytest.mark.slow
@pytest.mark.parametrize("dtype, external", [("float16", False), ("bfloat16", False), ("bfloat16", True)])
def test_half_stored_export_is_bit_identical_to_float32_export_of_the_rounded_merge(
    causal_base, causal_adapter, tmp_path, dtype, external, monkeypatch
):
    from loraexport.export import onnx as onnx_export

    if external:  # as a model over 2 GB is: weights in model.onnx.data, rewritten tensor by tensor
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    half_dir = tmp_path / "half"
    export(causal_base, half_dir, adapter=causal_adapter, dtype=dtype)
    assert (half_dir / "model.onnx.data").is_file() == external
    # the float32 export of the same rounded weights
    from loraexport.models.registry import load_base

    family, base = load_base(causal_base)
    rounded, _ = merged_model(base, [Adapter.load(causal_adapter)], storage_dtype=torch_dtype(dtype))
    f32_dir = tmp_path / "f32"
    f32_dir.mkdir()
    result = export_model(family, rounded, f32_dir)
    f32_meta = describe(family, rounded, result, None, ExportMode.MERGED)

    def init_bytes(d):
        return sum(
            numpy_helper.to_array(i).nbytes for i in onnx.load(str(d / "model.onnx")).graph.initializer
        )

    # the weights take half the bytes (a float32 positional table, not a weight, stays as it is)
    assert init_bytes(half_dir) < 0.6 * init_bytes(f32_dir)
    ids = np.random.default_rng(0).integers(4, 14, size=(3, 9))
    mask = np.ones_like(ids)
    a, b = (
        OnnxModel(half_dir).forward_all(ids, mask),
        OnnxModel(f32_dir, meta=f32_meta).forward_all(ids, mask),
    )
    for name in a:
        assert np.array_equal(a[name], b[name]), name  # lossless: the same float32 weights at run time


def test_stored_names_never_shadow_existing_ones(tmp_path):
    """An initializer already called ``a__stored_half`` does not collide with ``a``'s half copy."""
    a = np.full(32, 0.5, dtype=np.float32)
    b = np.full(32, 2.0, dtype=np.float32)
    path = _two_node_graph(tmp_path / "m.onnx", "Mul", a, b, b_name=f"a{SUFFIX}")
    assert store_weights_half(path, "float16", EXTERNAL_DATA_BYTES)["converted"] == 2
    assert np.array_equal(_y(path), (X + a) * b)
