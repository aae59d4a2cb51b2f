"""Parity verification passes on a correct export and catches planted errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from artifacts import copy_dir
from onnx import numpy_helper

from loraexport.errors import VerificationFailedError
from loraexport.stages.verify import verify
from loraexport.verify.latency import LatencyStats, time_interleaved
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
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 1.1  # the export was made with the original scaling
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
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


def test_time_interleaved_shuffles_and_reports_each_variant():
    calls = []
    variants = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    stats = time_interleaved(variants, warmup=1, min_runs=30, max_runs=30, budget_s=60)
    assert set(stats) == {"a", "b", "c"} and all(isinstance(s, LatencyStats) for s in stats.values())
    assert all(s.runs == 30 and s.p50_ms <= s.p90_ms for s in stats.values())
    rounds = [tuple(calls[i : i + 3]) for i in range(3, len(calls), 3)]
    assert len(set(rounds)) > 1  # the order changes between rounds
    followers = {calls[i + 1] for i in range(3, len(calls) - 1) if calls[i] == "a"}
    assert followers >= {"b", "c"}  # "a" is followed by different variants


def test_time_interleaved_stops_a_slow_model_at_twice_the_budget():
    import time

    stats = time_interleaved({"slow": lambda: time.sleep(0.04)}, warmup=1, min_runs=100, budget_s=0.05)
    assert stats["slow"].runs == 3  # floor_runs: 3 rounds take > 2 × budget; not 100


def test_latency_and_report_contract(seq2seq_base, seq2seq_adapter, seq2seq_onnx):
    report = verify(
        seq2seq_base,
        seq2seq_adapter,
        seq2seq_onnx,
        samples=1,
        latency=True,
        threads=1,
        latency_points=((1, 4), (2, 8)),
        latency_budget_s=0.2,
    )
    data = json.loads(json.dumps(report.to_json()))  # JSON-serialisable
    assert data["schema"] == 1
    assert set(data["versions"]) >= {"loraexport", "torch", "onnx", "onnxruntime"}
    assert set(data["base"]) >= {"path", "family", "parameters"}
    assert set(data["adapters"][0]) >= {"path", "sha256", "r", "alpha", "targets", "modules"}
    assert set(data["merge"]) >= {"modules_merged", "seconds", "compute_dtype", "storage_dtype"}
    assert set(data["parity"]) >= {
        "passed",
        "reference",
        "provider",
        "max_abs_err",
        "max_rel_err",
        "min_cosine",
        "top1_agreement",
        "generation_agreement",
        "tolerance",
        "cases",
    }
    lat = data["latency"]
    assert lat["provider"] == "cpu" and lat["threads"] == 1 and lat["unit"] == "ms"
    assert [(c["batch"], c["seq"]) for c in lat["cases"]] == [(1, 4), (2, 8)]
    variants = {"torch_unmerged", "torch_merged", "onnx_merged", "onnx_base", "onnx_unmerged"}
    for c in lat["cases"]:
        assert set(c["p50"]) == variants and set(c["p90"]) == variants
        assert all(v > 0 for v in c["p50"].values())
    assert "## Latency (cpu, 1 threads, ms)" in report.to_markdown()


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
