"""Half precision in verification (``verify/half.py``): what rounding the merged weights costs,
and a half-stored export judged against the rounded merge."""

from __future__ import annotations

import json

import onnx
import pytest

from loraexport.errors import VerificationFailedError
from loraexport.stages.export import export
from loraexport.stages.verify import verify


def test_half_precision_cost_is_reported(seq2seq_base, seq2seq_adapter, seq2seq_onnx):
    report = verify(
        seq2seq_base, seq2seq_adapter, seq2seq_onnx, samples=2, latency=False, half=("float16", "bfloat16")
    )
    costs = {(h.dtype, h.variant): h for h in report.half}
    variants = ("merged", "base_only", "no_adapter")
    assert set(costs) == {(d, v) for d in ("float16", "bfloat16") for v in variants}
    fp16, bf16 = costs["float16", "merged"], costs["bfloat16", "merged"]
    assert 0 < fp16.max_abs_err < bf16.max_abs_err  # bfloat16 keeps 8 mantissa bits, float16 11
    assert 0 < fp16.max_cast_rel_err < bf16.max_cast_rel_err
    # the adapter moves outputs far more than rounding does: most of its effect is retained
    assert 1 >= fp16.adapter_retained > bf16.adapter_retained > 0.5
    assert costs["float16", "no_adapter"].rms_err > 10 * fp16.rms_err
    assert report.passed  # informational: the float32 export's verdict is unchanged
    data = json.loads(json.dumps(report.to_json()))
    assert len(data["half_precision"]) == 6 and data["half_precision_failures"] == []
    assert "## Half precision (informational)" in report.to_markdown()


@pytest.mark.slow
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
