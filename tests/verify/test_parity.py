"""Parity (``verify/parity.py``): verification passes on a correct export, catches planted
errors, and derives its tolerance from float32's own noise."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from artifacts import copy_dir, edit_json
from onnx import numpy_helper
from tamper import restamp

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
    name = _corrupt_one_weight(broken)
    restamp(broken)  # loraexport.json agrees with the changed file: the proof tells, naming it
    with pytest.raises(VerificationFailedError, match="weights differ") as e:
        verify(seq2seq_base, seq2seq_adapter, broken, samples=3, latency=False)
    report = e.value.report  # the library raises, the report travels with the error
    assert report.passed is False and report.parity == []  # parity is not measured on a wrong file
    assert any(name in f for f in report.proof.failures), report.proof.failures
    # parity alone catches it too, naming the case and the output
    from loraexport.runtime.model import OnnxModel
    from loraexport.stages.inputs import load_inputs
    from loraexport.stages.merge import unmerged_model
    from loraexport.verify.parity import check_parity

    loaded = load_inputs(seq2seq_base, [seq2seq_adapter], False, None)
    unmerged = unmerged_model(loaded.base, loaded.adapters, loaded.weights)
    result = check_parity(loaded.family, unmerged, OnnxModel(broken, spinning=False), samples=3)
    assert result.passed is False and result.failures[0].startswith("b1xs8/")
    assert any(not c.passed for c in result.cases)


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


def test_a_padded_rows_float64_outputs_come_from_the_row_alone():
    """``_unpadded_rows``: where the padded float64 run is not finite (transformers' eager
    attention on a fully masked row), each padded row's unmasked positions are recomputed from
    that row alone and put back at their positions, along each output's sequence axis (1 for
    logits, 2 for a cache); finite rows and padded positions are left as they were."""
    import numpy as np

    from loraexport.verify.parity import _unpadded_rows

    def run(graph, feeds):  # a "model": position t's output is the sum of the row's unmasked ids ≤ t
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        total = np.cumsum(ids * mask, axis=1).astype(np.float64)
        if (mask == 0).any():  # the padded batch: NaN everywhere in a padded row
            total[(mask == 0).any(axis=1)] = np.nan
        return {
            "logits": total[:, :, None] * np.ones(3),
            "present.0.key": total[:, None, :, None] * np.ones((1, 2, 1, 4)),
        }

    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = {f"model.{k}": v for k, v in run("model", {"input_ids": ids, "attention_mask": mask}).items()}
    _unpadded_rows(run, (1, 2, 4), (ids, mask, None), out)
    np.testing.assert_array_equal(out["model.logits"][0, 2:, 0], [5, 11, 18])
    np.testing.assert_array_equal(out["model.present.0.key"][0, 1, 2:, 3], [5, 11, 18])
    assert np.isnan(out["model.logits"][0, :2]).all()  # padding: not compared, left alone
    np.testing.assert_array_equal(out["model.logits"][1, :, 0], [1, 3, 6, 10, 15])
