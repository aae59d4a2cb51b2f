"""int8-dynamic's activations, quantized per token (``export.dynamic.per_token_activations``):
the rewrite of ``quantize_dynamic``'s per-tensor quantizer computes what it says, row by row, in
every opset the exporters write, and the dequantized twin (``verify.dequantized``) reads it back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from loraexport.core.enums import Precision
from loraexport.export.qformat import dynamic_dequantize, per_token_input
from loraexport.export.quantize import ACTIVATIONS_PER_TOKEN, quantization_description, quantize_graph
from loraexport.verify.dequantized import float_compute_graph

K, N = 64, 24


def _matmul_file(tmp_path, opset: int, rank: int = 3):
    """x (…, K) @ W (K, N) + a second MatMul reading the same x: two quantized products, one
    activation quantizer (quantize_dynamic shares it)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), "w2")
    dims = ["B", "S", K][-rank:]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="m1"),
         helper.make_node("MatMul", ["x", "w2"], ["y2"], name="m2")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [*dims[:-1], N]) for y in ("y1", "y2")],
        [w1, w2],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    quantize_graph(path, Precision.INT8_DYNAMIC)
    return path


def _session(model) -> ort.InferenceSession:
    blob = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def _weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    t = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {
        w: dynamic_dequantize(t[f"{w}_quantized"], t[f"{w}_scale"], t[f"{w}_zero_point"])
        for w in ("w1", "w2")
    }


def _per_token_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64: each row's codes round(x / s) against s = max|x| / 127, times the weight."""
    s = np.maximum(
        np.abs(x).max(-1, keepdims=True).astype(np.float32) * np.float32(1 / 127), np.finfo(np.float32).tiny
    )
    codes = np.rint(x / s)
    return (codes.astype(np.float64) * s.astype(np.float64)) @ w.astype(np.float64)


@pytest.mark.parametrize("opset", [17, 21])  # ReduceMax's axes: an attribute before 18, an input since
def test_each_row_is_quantized_against_its_own_scale(tmp_path, opset):
    path = _matmul_file(tmp_path, opset)
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "DynamicQuantizeLinear" not in ops and ops.count("MatMulInteger") == 2
    assert ops.count("ReduceMax") == 1  # one quantizer for the activation both products read
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[1, 2] *= 1000.0  # an outlier token
    x[0, 3] = 0.0  # an all-zero token
    y1, y2 = _session(path).run(None, {"x": x})
    w = _weights(path)
    for got, weight in ((y1, w["w1"]), (y2, w["w2"])):
        want = _per_token_reference(x, weight)
        # the same codes and scales; what is left is float32 accumulation of the scaled int32
        # products: a few ulps of each row's largest term
        bound = 1e-5 * (np.abs(x).max(-1, keepdims=True) * np.abs(weight).sum(0)) + 1e-30
        assert np.all(np.abs(got - want) <= bound)
    assert np.all(np.isfinite(y1)) and np.all(y1[0, 3] == 0)


def test_a_rows_result_does_not_depend_on_the_other_rows(tmp_path):
    """What per-tensor scaling could not give: a token's product is the same alone or beside an
    outlier (quantize_dynamic's one scale made the others' codes 1000x coarser)."""
    path = _matmul_file(tmp_path, 21)
    s = _session(path)
    x = np.random.default_rng(2).standard_normal((1, 4, K)).astype(np.float32)
    alone = s.run(None, {"x": x[:, :1]})[0]
    beside = x.copy()
    beside[0, 1:] *= 1000.0
    np.testing.assert_array_equal(s.run(None, {"x": beside})[0][:, :1], alone)


def test_two_dimensional_activations_work_too(tmp_path):
    """An LM head after the last position's Gather reads (B, H): the rows are the batch."""
    path = _matmul_file(tmp_path, 21, rank=2)
    x = np.random.default_rng(3).standard_normal((3, K)).astype(np.float32)
    y1, _ = _session(path).run(None, {"x": x})
    want = _per_token_reference(x, _weights(path)["w1"])
    assert np.abs(y1 - want).max() <= 1e-5 * np.abs(want).max()


def test_the_float_twin_reads_the_chain_back(tmp_path):
    """verify's float-compute graph replaces each per-token product by x @ dequantized W."""
    path = _matmul_file(tmp_path, 21)
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    codes = next(n.input[0] for n in model.graph.node if n.op_type == "MatMulInteger")
    assert per_token_input(codes, producer) == "x"
    assert per_token_input("x", producer) is None  # a float input is not a chain
    twin, changed = float_compute_graph(model)
    assert changed == 2
    x = np.random.default_rng(4).standard_normal((2, 3, K)).astype(np.float32)
    y1, y2 = _session(twin).run(None, {"x": x})
    w = _weights(path)
    np.testing.assert_allclose(y1, x @ w["w1"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, x @ w["w2"], rtol=1e-5, atol=1e-5)


def test_the_description_says_per_token():
    d = quantization_description(Precision.INT8_DYNAMIC, "merged")
    assert d["activations"] == ACTIVATIONS_PER_TOKEN and "per token" in d["method"]
