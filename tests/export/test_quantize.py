"""``--quantize int8|int8-dynamic|int4``: the graph's MatMuls quantized, the adapter merged or kept in
float32 beside the quantized base, and verification against the unmerged float32 model with
``adapter_retained`` as the gate (``verify.quantized``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from artifacts import edit_tensors
from clihelp import QUICK, ok, refused, run, untouched

from loraexport.core.enums import ExportMode
from loraexport.export.quantize import lora_matmuls
from loraexport.runtime.model import OnnxModel
from loraexport.stages.export import describe, export, export_model, lora_factors
from loraexport.stages.inputs import load_inputs
from loraexport.stages.merge import unmerged_model
from loraexport.verify.quantized import quantization_cost

pytestmark = pytest.mark.slow  # exports and real processes
QUANTIZED_OPS = {"int8": "MatMulNBits", "int8-dynamic": "MatMulInteger", "int4": "MatMulNBits"}
ATTENTION_MATMULS = 4  # the reference decoder's 2 layers × (Q·Kᵀ, P·V): activations, never quantized


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path / "model.onnx")).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_the_lora_branch_is_found_by_its_tensors(causal_base, causal_adapter, tmp_path):
    loaded = load_inputs(causal_base, [causal_adapter])
    export(causal_base, tmp_path / "unmerged", adapter=causal_adapter, mode="unmerged")
    export(causal_base, tmp_path / "merged", adapter=causal_adapter)
    factors = lora_factors(loaded)
    assert len(lora_matmuls(tmp_path / "unmerged" / "model.onnx", factors)) == len(factors)  # x·Aᵀ, ·Bᵀ
    assert lora_matmuls(tmp_path / "merged" / "model.onnx", factors) == []  # merged: no branch left


@pytest.mark.parametrize("dtype", list(QUANTIZED_OPS))
@pytest.mark.parametrize("keep", [False, True])
def test_quantized_exports(causal_base, causal_adapter, tmp_path, dtype, keep):
    out = tmp_path / "q"
    export(causal_base, out, adapter=causal_adapter, quantize=dtype, keep_adapter=keep)
    ops = _ops(out)
    lora = 8 if keep else 0  # 2 layers × q, v × (A, B), kept in float32
    assert ops.get("MatMul", 0) == ATTENTION_MATMULS + lora
    assert ops[QUANTIZED_OPS[dtype]] >= 9  # every projection and the LM head
    meta = json.loads((out / "loraexport.json").read_text())
    assert meta["weights_dtype"] == dtype and meta["mode"] == ("unmerged" if keep else "merged")
    assert meta["quantization"]["adapter"] == ("kept in float32" if keep else "merged")
    ids = np.array([[5, 6, 7, 8]])
    assert np.isfinite(OnnxModel(out).forward(ids, np.ones_like(ids))).all()


def test_retained_is_one_when_nothing_is_quantized(causal_base, causal_adapter, tmp_path):
    """The measure's oracle: float32 exports in place of the quantized ones give back the
    adapter's whole effect (1 up to float32 noise, here 1e-4 of an effect of O(0.1-1)) and
    the unmerged model's top-1."""
    loaded = load_inputs(causal_base, [causal_adapter])
    unmerged = unmerged_model(loaded.base, loaded.adapters)
    opened = []
    for name, model, mode in (("u", unmerged, ExportMode.UNMERGED), ("b", loaded.base, ExportMode.BASE)):
        d = tmp_path / name
        d.mkdir()
        result = export_model(loaded.family, model, d)
        opened.append(OnnxModel(d, meta=describe(loaded.family, model, result, None, mode)))
    cost = quantization_cost(loaded.family, loaded.base, unmerged, *opened, "float32", "merged", samples=2)
    assert cost.adapter_retained == pytest.approx(1.0, abs=1e-4)
    assert cost.top1_agreement == 1.0 and cost.generation_agreement == 1.0
    assert cost.adapter_effect_rms > 1e-3  # the adapter moves the outputs: the measure means something


def test_merge_and_export_int8_keeps_the_adapter(causal_base, causal_adapter, tmp_path):
    r = ok(
        run(
            "merge-and-export",
            "--base",
            causal_base,
            "--adapter",
            causal_adapter,
            "--out",
            tmp_path / "o",
            "--quantize",
            "int8",
            *QUICK,
        )
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    (row,) = report["quantization"]
    assert report["passed"] is True and report["proof"]["passed"]
    # parity is judged against the dequantized reference, computing in float32: float32 noise
    assert report["parity"]["passed"] and report["parity"]["top1_agreement"] == 1.0
    assert row["adapter_retained"] > 0.9 and row["top1_agreement"] > 0.9  # measured here: 0.98, 0.97+
    assert "quantized int8" in r.stdout


def test_an_adapter_erased_by_quantization_is_said_and_fails_under_a_budget(
    causal_base, causal_adapter, tmp_path
):
    """B scaled by 1e-4: ΔW and its effect sit far below int8's rounding of the weights and
    activations, so the quantized export behaves as the base does. The file is still the
    reference's quantization (proven, exit 0, a warning in the report); with a budget it fails."""
    small = tmp_path / "small"
    shutil.copytree(causal_adapter, small)
    edit_tensors(small, lambda t: t.update({k: v * 1e-4 for k, v in t.items() if "lora_B" in k}))
    args = ("--base", causal_base, "--adapter", small, "--quantize", "int8", *QUICK)
    r = ok(run("merge-and-export", "--out", tmp_path / "o", *args))
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["proof"]["passed"] and report["quantization"][0]["adapter_retained"] < 0.5
    assert (
        "--min-adapter-retained" in report["warnings"][0]
        and "warning" in (tmp_path / "o" / "report.md").read_text()
    )
    r = run("merge-and-export", "--out", tmp_path / "gated", "--min-adapter-retained", "0.5", *args)
    refused(r, 4, "quality budget not met", "int8", "--min-adapter-retained 0.5", printed=True)
    report = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert report["passed"] is False and report["quantization_failures"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--keep-adapter"], "give --quantize"),
        (["--quantize", "int8", "--dtype", "float16"], "give one"),
    ],
)
def test_quantize_options_that_cannot_work(causal_base, causal_adapter, tmp_path, extra, needle):
    with untouched(tmp_path):
        r = run(
            "export", "--model", causal_base, "--adapter", causal_adapter, "--out", tmp_path / "o", *extra
        )
        refused(r, 3, needle)


def test_keep_adapter_needs_an_adapter(causal_base, tmp_path):
    with untouched(tmp_path):
        refused(
            run(
                "export",
                "--model",
                causal_base,
                "--out",
                tmp_path / "o",
                "--quantize",
                "int4",
                "--keep-adapter",
            ),
            3,
            "needs an --adapter",
        )


def _gemm_graph(trans_b: int, alpha: float = 1.0, bias: bool = True, tied: bool = False) -> onnx.ModelProto:
    """x (2, 6) → Gemm(W, b) → y; ``tied``: W also feeds a second output (an embedding's Gather)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 6) if trans_b else (6, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "W", "b"] if bias else ["x", "W"], ["y"], name="proj", transB=trans_b, alpha=alpha
        )
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if tied:
        nodes.append(helper.make_node("Identity", ["W"], ["w_out"], name="tie"))
        outputs.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, None))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_a_gemm_with_a_constant_weight_becomes_a_matmul(trans_b, bias, tied):
    from loraexport.export.quantize import gemms_to_matmuls

    model = _gemm_graph(trans_b, bias=bias, tied=tied)
    want = _run(model)
    assert gemms_to_matmuls(model) == 1
    assert [n.op_type for n in model.graph.node][:1] == ["MatMul"] and model.graph.node[0].name == "proj"
    got = _run(model)
    for w, g in zip(want, got, strict=True):  # the same products, summed in another order: float32 noise
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_a_gemm_that_is_no_plain_product_is_left_alone():
    from loraexport.export.quantize import gemms_to_matmuls

    model = _gemm_graph(1, alpha=0.5)
    assert gemms_to_matmuls(model) == 0 and model.graph.node[0].op_type == "Gemm"


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_gpt2_conv1d_weights_are_quantized(tmp_path, dtype):
    """GPT-2's Conv1D exports as Gemm: each of its projections is quantized, not only the LM
    head (until 2026-11-30, 48 of GPT-2-small's 49 weight matrices stayed float32)."""
    from artifacts import make_hf_decoder

    make_hf_decoder(tmp_path / "base", "gpt2")
    export(tmp_path / "base", tmp_path / "q", quantize=dtype)
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "Gemm" not in ops
    assert ops.count("MatMulNBits") == 2 * 4 + 1  # 2 layers × (c_attn, c_proj, c_fc, mlp c_proj) + LM head
