"""Half-stored ONNX weights: lossless against the rounded merge, verified, and errors caught."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from loraexport.cli import main
from loraexport.dtypes import torch_dtype
from loraexport.enums import ExportMode
from loraexport.errors import VerificationFailedError
from loraexport.export.half import SUFFIX, store_weights_half
from loraexport.export.onnx import EXTERNAL_DATA_BYTES
from loraexport.lora.adapter import Adapter
from loraexport.runtime import OnnxModel
from loraexport.stages.export import describe, export, export_model
from loraexport.stages.merge import merged_model
from loraexport.stages.verify import verify


def test_only_exactly_representable_initializers_are_converted(tmp_path):
    exact = np.array([0.5, -2.0, 1024.0, 0.0] * 8, dtype=np.float32)  # exact in float16 and bfloat16
    inexact = np.full(32, 0.1, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "a"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [32])],
        [numpy_helper.from_array(exact, "a"), numpy_helper.from_array(inexact, "b")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    counts = store_weights_half(path, "bfloat16", EXTERNAL_DATA_BYTES)
    assert counts["converted"] == 1 and counts["kept"] == 1
    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert inits[f"a{SUFFIX}"].data_type == onnx.TensorProto.BFLOAT16 and "b" in inits
    import onnxruntime as ort

    x = np.arange(32, dtype=np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(y, x + exact + inexact)  # the graph computes exactly what it did


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


def test_verify_of_half_export_judges_against_rounded_merge_and_reports_the_cost(
    causal_base, causal_adapter, tmp_path
):
    out = tmp_path / "half"
    export(causal_base, out, adapter=causal_adapter, dtype="bfloat16")
    report = verify(causal_base, causal_adapter, out, samples=2, latency=False)
    assert report.passed, report.failures
    assert "rounded to bfloat16" in report.parity[0].reference
    variants = {(h.dtype, h.variant) for h in report.half}
    assert ("bfloat16", "merged") in variants  # the rounding's cost vs the unmerged model, always reported
    # a planted error in one stored bfloat16 weight is caught
    model = onnx.load(str(out / "model.onnx"))
    init = next(
        i
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.BFLOAT16 and len(i.raw_data) > 512
    )
    raw = bytearray(init.raw_data)
    raw[1] ^= 0x40  # the high byte of the first value: an exponent bit
    init.raw_data = bytes(raw)
    onnx.save(model, str(out / "model.onnx"))
    with pytest.raises(VerificationFailedError) as e:
        verify(causal_base, causal_adapter, out, samples=2, latency=False)
    assert e.value.report.passed is False


def test_half_dtype_with_unmerged_mode_is_refused(causal_base, causal_adapter, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["export", "--model", str(causal_base), "--adapter", str(causal_adapter), "--out", str(out)]
        + ["--mode", "unmerged", "--dtype", "float16"],
    )
    assert r.exit_code == 3 and "does not apply to --mode unmerged" in r.stderr
    assert not out.exists()


def test_adapter_lost_to_rounding_fails_verification(causal_base, causal_adapter, tmp_path):
    """A ΔW far below bfloat16's spacing of W rounds away: the file is exact against its rounded
    weights, and useless; verification must say so (exit 4), not pass."""
    tiny = Adapter.load(causal_adapter)
    tiny.weights = {p: (a, b * 1e-6) for p, (a, b) in tiny.weights.items()}
    (tmp_path / "tiny").mkdir()
    tiny.save(tmp_path / "tiny")
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "merge-and-export",
            "--base",
            str(causal_base),
            "--adapter",
            str(tmp_path / "tiny"),
            "--out",
            str(out),
        ]
        + ["--dtype", "bfloat16", "--no-latency", "--samples", "2"],
    )
    assert r.exit_code == 4, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: adapter lost in half precision") and "survives rounding" in last
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["parity"]["passed"] is True  # exact, and still refused
    merged = next(h for h in report["half_precision"] if h["variant"] == "merged")
    assert merged["adapter_retained"] < 0.5


def test_stored_names_never_shadow_existing_ones(tmp_path):
    """An initializer already called ``a__stored_half`` does not collide with ``a``'s half copy."""
    a = np.full(32, 0.5, dtype=np.float32)
    b = np.full(32, 2.0, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "a"], ["y0"]), helper.make_node("Mul", ["y0", f"a{SUFFIX}"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [32])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, f"a{SUFFIX}")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert store_weights_half(path, "float16", EXTERNAL_DATA_BYTES)["converted"] == 2
    import onnxruntime as ort

    x = np.arange(32, dtype=np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(y, (x + a) * b)
