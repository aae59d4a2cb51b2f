"""Parity (``verify/parity.py``): verification passes on a correct export, catches planted
errors, and derives its tolerance from float32's own noise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from artifacts import copy_dir, edit_json
from onnx import numpy_helper

from loraexport.errors import VerificationFailedError
from loraexport.lora.adapter import CONFIG_NAME
from loraexport.stages.verify import verify
from loraexport.verify.parity import compare_outputs

PLANT = 0.05  # added to one weight: ~1% of a typical weight, far above float32 noise


def _corrupt_one_weight(onnx_dir, graph: str = "decoder") -> str:
    path = onnx_dir / f"{graph}.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.dtype == np.float32 and arr.size >= 256:
            arr = arr.copy()
            arr.flat[0] += PLANT
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            onnx.save(model, str(path))
            return init.name
    raise AssertionError("no weight to corrupt")


@pytest.mark.parametrize("which", ["seq2seq", "causal"])
def test_parity_passes(which, request):
    base, adapter, onnx_dir = (request.getfixturevalue(f"{which}_{x}") for x in ("base", "adapter", "onnx"))
    report = verify(base, adapter, onnx_dir, samples=4, latency=False)
    p = report.parity[0]
    assert report.passed, p.failures
    assert p.max_abs_err <= 1e-4 and p.top1_agreement == 1.0
    assert p.generation.rows > 0 and p.generation.identical_rows == p.generation.rows
    assert len(p.cases) == 4 and all(len(c.outputs) > 1 for c in p.cases)  # every output, not just logits


def test_planted_weight_error_is_caught(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    broken = copy_dir(seq2seq_onnx, tmp_path / "broken")
    _corrupt_one_weight(broken)
    with pytest.raises(VerificationFailedError, match="parity failed") as e:
        verify(seq2seq_base, seq2seq_adapter, broken, samples=3, latency=False)
    report = e.value.report  # the library raises, the report travels with the error
    assert report.passed is False
    failures = report.parity[0].failures
    assert failures and failures[0].startswith("b1xs8/")  # the report names the case and output
    data = report.to_json()
    assert data["parity"]["passed"] is False
    assert any(not c["passed"] for c in data["parity"]["cases"])


def test_wrong_scaling_is_caught(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    wrong = copy_dir(seq2seq_adapter, tmp_path / "adapter")
    # the export was made with the original scaling
    edit_json(wrong / CONFIG_NAME, lambda config: config | {"lora_alpha": config["lora_alpha"] * 1.1})
    with pytest.raises(VerificationFailedError) as e:
        verify(seq2seq_base, wrong, seq2seq_onnx, samples=2, latency=False)
    assert e.value.report.passed is False


def test_compare_outputs_tolerance_is_derived():
    rng = np.random.default_rng(0)
    ref64 = rng.normal(size=(2, 3, 5))
    noise = 1e-6
    ref32 = ref64 + rng.normal(size=ref64.shape) * noise
    ok = compare_outputs("logits", ref32, ref64, ref64 + rng.normal(size=ref64.shape) * noise, None)
    assert ok.passed and ok.top1_agreement == 1.0
    bad = compare_outputs("logits", ref32, ref64, ref64 + 1e-3, None)  # 1000x the noise
    assert not bad.passed and bad.tolerance < 1e-3
    wrong_shape = compare_outputs("logits", ref32, ref64, ref64[:, :2], None)
    assert not wrong_shape.passed
