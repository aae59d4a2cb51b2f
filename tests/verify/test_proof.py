"""The pieces of the weight-level proof, each against an independent computation: the quantized
formats against onnxruntime's own kernels, the comparison's tolerance (bit-exact, or one step on a
bounded share of codes with identical scales), the float-compute twin of a graph, the gates'
rules, ``loraexport.json``'s own digest."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from loraexport.artifact.manifest import SELF_DIGEST, check_description, description_digest
from loraexport.export.qformat import (
    NBits,
    dynamic_dequantize,
    nbits_codes,
    nbits_dequantize,
    nbits_quantize,
    source_of,
)
from loraexport.verify.dequantized import float_compute_graph
from loraexport.verify.gates import Budget, quality_failures, retained_band
from loraexport.verify.proof import MAX_STEP_SHARE, FileProof, Role, compare_tensor, roles
from loraexport.verify.quantized import QuantCost

MS = "com.microsoft"
# float32 matmul of K ≤ 96 terms of O(1): a few ulps of the largest partial sums, far below 1e-4
MATMUL_ATOL = 1e-4


def _session(nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _nbits_graph(packed, scales, fmt: NBits, level: int, x_shape) -> ort.InferenceSession:
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain=MS, K=fmt.k, N=fmt.n,
                            bits=fmt.bits, block_size=fmt.block, accuracy_level=level)  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")]
    return _session([node], [x], [y], inits)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 96), st.integers(1, 24), st.sampled_from([4, 8]), st.sampled_from([16, 32]),
    st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_nbits_dequantize_is_what_onnxruntime_computes_at_accuracy_level_0(k, n, bits, block, seed):
    """Our reading of a MatMulNBits weight (codes, zero, scales, K not a multiple of the block)
    against onnxruntime's kernel, in float64: the same products to float32 noise."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    fmt = NBits(k, n, bits, block)
    packed, scales = nbits_quantize(w, bits, block)
    deq = nbits_dequantize(packed, scales, fmt)
    assert deq.shape == (k, n)
    # each weight is within one step of its block's scale: half a step by rounding, except that the
    # scale carries the sign of the block's largest weight, which takes code -8 (of -8..7): a weight
    # of the other sign near that magnitude is clamped at 7
    step = np.abs(np.repeat(scales, block, axis=1)[:, :k].T)
    assert np.all(np.abs(deq - w) <= step * (1 + 1e-6))
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = _nbits_graph(packed, scales, fmt, 0, x.shape).run(None, {"x": x})[0]
    assert np.abs(y - x.astype(np.float64) @ deq.astype(np.float64)).max() < MATMUL_ATOL


def test_dynamic_dequantize_and_its_float_compute_twin():
    """quantize_dynamic's MatMulInteger chain rewritten as MatMul(x, DequantizeLinear(W)): the
    product of the float input with our dequantized weight, to float32 noise; the chain itself
    (activations quantized per tensor) is further off."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 8)).astype(np.float32)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 24])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 8])],
                              [numpy_helper.from_array(w, "w")])  # fmt: skip
    src = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as td:
        onnx.save(src, f"{td}/f.onnx")
        quantize_dynamic(f"{td}/f.onnx", f"{td}/q.onnx", per_channel=True, weight_type=QuantType.QInt8)
        q = onnx.load(f"{td}/q.onnx")
        twin, changed = float_compute_graph(onnx.load(f"{td}/q.onnx"))
        assert changed == 1 and source_of("w_quantized") == ("w", "weight")
        inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
        deq = dynamic_dequantize(inits["w_quantized"], inits["w_scale"], inits["w_zero_point"])
        ours = x.astype(np.float64) @ deq.astype(np.float64)
        got = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        assert np.abs(got - ours).max() < MATMUL_ATOL
        chain = ort.InferenceSession(str(Path(td) / "q.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        assert np.abs(chain - ours).max() > 10 * MATMUL_ATOL  # the activations' own quantization


def _packed(seed: int = 0, k: int = 64, n: int = 40):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    fmt = NBits(k, n, 4, 16)
    packed, scales = nbits_quantize(w, 4, 16)
    return packed, scales, fmt


def _bump(packed, fmt: NBits, index: int, by: int) -> np.ndarray:
    """``packed`` with code ``index`` (of the flat codes) moved by ``by`` steps (4 bits)."""
    codes = nbits_codes(packed, fmt).reshape(-1)
    codes[index] = np.clip(codes[index] + by, 0, 15)
    codes = codes.reshape(fmt.n, fmt.blocks, fmt.block)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def test_a_tensor_is_proven_bit_exact_or_within_one_step_on_few_codes():
    packed, _, fmt = _packed()
    role = Role("weight", "MatMulNBits", "y", fmt)
    exact = FileProof("f")
    compare_tensor("w_Q4", packed, packed.copy(), role, exact, {})
    assert exact.passed and exact.tensors == exact.quantized == 1 and not exact.off_by_step
    assert _bump(packed, fmt, 0, 0).tobytes() == packed.tobytes()  # the packing helper is exact
    one = FileProof("f")  # one code of 2560 off by one step: 3.9e-4 > MAX_STEP_SHARE, refused
    compare_tensor("w_Q4", packed, _bump(packed, fmt, 5, 1), role, one, {})
    assert not one.passed and "1 of 2560 codes" in one.failures[0]
    big, _, big_fmt = _packed(k=1024, n=64)  # 65,536 codes: one off is 1.5e-5 of them
    accepted = FileProof("f")
    compare_tensor(
        "w_Q4", big, _bump(big, big_fmt, 7, 1), Role("weight", "MatMulNBits", "y", big_fmt), accepted, {}
    )
    assert accepted.passed and accepted.off_by_step == [{"tensor": "w_Q4", "codes": 1, "of": 65536}]
    assert 1 / 65536 <= MAX_STEP_SHARE
    two = FileProof("f")  # two steps: never a rounding tie
    compare_tensor(
        "w_Q4", big, _bump(big, big_fmt, 7, 2), Role("weight", "MatMulNBits", "y", big_fmt), two, {}
    )
    assert not two.passed and "up to 2 steps" in two.failures[0]
    scales_moved = FileProof("f")  # the same codes are only equal weights under equal scales
    compare_tensor("w_Q4", big, _bump(big, big_fmt, 7, 1), Role("weight", "MatMulNBits", "y", big_fmt),
                   scales_moved, {}, scales_equal=lambda: False)  # fmt: skip
    assert not scales_moved.passed


def test_float_tensors_are_bit_exact_and_named_with_their_modules():
    fp = FileProof("f")
    want = np.arange(6, dtype=np.float32)
    compare_tensor(
        "x.weight.T_scales", want, want + np.float32(1e-7), None, fp, {"x.weight.T": (("model.x", 6),)}
    )
    assert not fp.passed and "model.x" in fp.failures[0]
    shape = FileProof("f")
    compare_tensor("t", want, want.reshape(2, 3), None, shape, {})
    assert "float32[2, 3]" in shape.failures[0]


def test_roles_name_each_quantized_tensor_of_a_graph():
    packed, scales, fmt = _packed()
    node = helper.make_node("MatMulNBits", ["x", "w_Q4", "w_scales"], ["y"], domain=MS, K=fmt.k, N=fmt.n,
                            bits=4, block_size=16, accuracy_level=4)  # fmt: skip
    g = helper.make_graph([node], "g", [], [], [numpy_helper.from_array(packed, "w_Q4")])
    found = roles(helper.make_model(g))
    assert found["w_Q4"].fmt == fmt and found["w_scales"].kind == "scales" and found["w_Q4"].node == "y"


def test_the_float_compute_twin_is_the_kernel_at_accuracy_level_0():
    packed, scales, fmt = _packed()
    x = np.random.default_rng(1).standard_normal((2, fmt.k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain=MS, K=fmt.k, N=fmt.n, bits=4,
                            block_size=16, accuracy_level=4)  # fmt: skip
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, fmt.k])
    g = helper.make_graph(
        [node], "g", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)], ir_version=10
    )
    twin, changed = float_compute_graph(model)
    assert changed == 1
    got = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    want = x.astype(np.float64) @ nbits_dequantize(packed, scales, fmt).astype(np.float64)
    assert np.abs(got - want).max() < MATMUL_ATOL


def _cost(retained: float | None, top1: float | None = 0.9) -> QuantCost:
    return QuantCost("int4", "merged", 0.1, 0.01, top1, 0.5, 1.0, retained)


@pytest.mark.parametrize(
    "retained, fails",
    [(1.0, False), (0.9, False), (1.1, False), (0.899, True), (1.24, True), (1.101, True), (-0.2, True)],
)
def test_adapter_retained_is_bounded_on_both_sides_where_it_gates(retained, fails):
    assert retained_band(0.9) == (0.9, 1.1)
    out = quality_failures(_cost(retained), Budget(min_adapter_retained=0.9), "int4")
    assert bool(out) is fails, out


def test_quality_is_reported_not_judged_without_a_budget():
    assert quality_failures(_cost(0.1, top1=0.0), Budget(), "int4") == []
    assert quality_failures(_cost(1.0, top1=0.9), Budget(min_top1=0.95), "int4")[0].startswith("int4: top-1")


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), float("inf"), True, "0.9"])
def test_a_budget_outside_zero_to_one_is_refused(value):
    from loraexport.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="must be"):
        Budget(min_top1=value)


def test_loraexport_json_digests_itself():
    meta = {"model": {"kind": "causal"}, "files": {"model.onnx": "ab" * 32}, "weights_dtype": "int4"}
    meta[SELF_DIGEST] = description_digest(meta)
    assert check_description(meta) == "ok"
    reordered = json.loads(json.dumps(dict(reversed(list(meta.items())))))  # key order is free
    assert check_description(reordered) == "ok"
    assert check_description(meta | {"weights_dtype": "int8"}).startswith("edited after it was written")
    assert check_description({k: v for k, v in meta.items() if k != SELF_DIGEST}).startswith(
        "carries no digest"
    )
    assert check_description(meta | {"x": float("nan")}).startswith("holds a value JSON cannot carry")


def test_modules_map_to_quantized_tensors_both_ways():
    """A weight nobody holds, a module held twice, a module the quantizer left float32: each named."""
    from loraexport.verify.proof import check_claims

    packed, scales, fmt = _packed()

    def nbits(x, w, out):
        return helper.make_node("MatMulNBits", [x, f"{w}_Q4", f"{w}_scales"], [out], domain=MS, K=fmt.k,
                                N=fmt.n, bits=4, block_size=16)  # fmt: skip

    nodes = [nbits("x", "a", "y1"), nbits("y1", "b", "y2"), helper.make_node("MatMul", ["y2", "c"], ["y3"])]
    inits = [numpy_helper.from_array(np.ones((2, 2), np.float32), "c")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], inits))
    fp = FileProof("f")
    check_claims(model, {"a": (("m.q", 40),), "b": (("m.q", 40),), "c": (("m.k", 2),)}, fp)
    assert any("m.q is held by 'a_Q4' and 'b_Q4'" in f for f in fp.failures)
    assert any("m.k stays a float32 MatMul" in f for f in fp.failures)
    orphan = FileProof("f")
    check_claims(model, {"a": (("m.q", 40),)}, orphan)
    assert any("'b_Q4'" in f and "holds no module" in f for f in orphan.failures)
    fine = FileProof("f")
    check_claims(model, {"a": (("m.q", 40),), "b": (("m.v", 40),)}, fine)
    assert fine.passed and fine.modules == 2


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 80), st.integers(1, 20), st.sampled_from([4, 8]), st.integers(0, 2**31 - 1))
def test_the_torch_reading_equals_the_reference_reading_bit_for_bit(k, n, bits, seed):
    """``verify.dequantized.dequantized_rows`` (torch, rows, what the references use) against
    ``export.qformat.nbits_dequantize`` (numpy, tested against onnxruntime above)."""
    from loraexport.verify.dequantized import dequantized_rows

    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    packed, scales = nbits_quantize(w, bits, 16)
    fmt = NBits(k, n, bits, 16)

    class File:
        def array(self, name):
            return {"w_Q": packed, "w_scales": scales}[name]

    rows = dequantized_rows(File(), "w_Q", "w", Role("weight", "MatMulNBits", "y", fmt)).numpy()
    assert rows.tobytes() == np.ascontiguousarray(nbits_dequantize(packed, scales, fmt).T).tobytes()
