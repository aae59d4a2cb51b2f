"""``report.py`` on hand-built results: the verdict, the failures, ``report.json`` (numbers as
numbers) and ``report.md`` / the summary rows (numbers formatted only there)."""

from __future__ import annotations

import json

import pytest

from loraexport.export.onnx import ExportResult
from loraexport.lora.merge import MergeStats, ModuleMerge
from loraexport.report.contents import LATENCY_VARIANTS, SCHEMA, Report
from loraexport.verify.half import HalfCost
from loraexport.verify.latency import LatencyCase, LatencyResult, LatencyStats
from loraexport.verify.parity import GenerationResult, OutputParity, ParityCaseResult, ParityResult

SHA = "0123456789abcdef" * 4
BASE = {"path": "runs/base", "family": "reference", "parameters": 1234567}
ADAPTER = {"path": "runs/ad", "r": 4, "alpha": 16.0, "targets": ["q", "v"], "modules": 6, "sha256": SHA}


def _output(name: str, err: float = 1e-6, tolerance: float = 1e-5, top1: float | None = None) -> OutputParity:
    return OutputParity(
        output=name,
        max_abs_err=err,
        max_rel_err=err / 4,
        min_cosine=0.99999994,
        onnx_err_vs_fp64=err,
        torch_err_vs_fp64=err / 2,
        tolerance=tolerance,
        passed=err <= tolerance,
        top1_agreement=top1,
    )


def _parity(provider: str = "cpu", logits_err: float = 1e-6, top1: float = 1.0) -> ParityResult:
    case = ParityCaseResult(
        "b1xs8", 1, 8, [_output("logits", logits_err, top1=top1), _output("present.0.key")]
    )
    return ParityResult(provider, [case], GenerationResult(rows=2, identical_rows=2, max_new_tokens=4))


def _latency() -> LatencyResult:
    stats = {
        "torch_unmerged": LatencyStats(p50_ms=4.0, p90_ms=5.0, iqr_ms=0.5, runs=100),
        "onnx_merged": LatencyStats(p50_ms=2.0, p90_ms=3.0, iqr_ms=0.25, runs=100),
        "onnx_base": LatencyStats(p50_ms=1.0, p90_ms=1.5, iqr_ms=0.125, runs=100),
    }
    return LatencyResult("cpu", threads=1, cases=[LatencyCase(batch=1, seq=4, stats=stats)])


def _half(retained: float = 0.9) -> HalfCost:
    return HalfCost("bfloat16", "merged", 0.0123, 0.99, None, 2.5e-3, 0.004, retained)


def _report(**kw) -> Report:
    return Report(base=dict(BASE), adapters=[dict(ADAPTER)], **kw)


# ---- the verdict ----------------------------------------------------------------------------------
def test_a_passing_report():
    report = _report(parity=[_parity()])
    assert report.passed is True and report.failures == [] and report.verdict == "passed"
    assert report.to_json()["passed"] is True
    assert report.to_markdown().startswith("# loraexport report\n\nVerification: **PASSED**\n")


def test_a_report_without_parity_is_not_verified():
    report = _report()
    assert report.passed is None and report.failures == []
    assert _report(half_failures=["lost"]).passed is False  # a failed half-precision gate alone fails
    data = report.to_json()
    assert data["passed"] is None and data["parity"] is None and data["latency"] is None
    assert data["half_precision"] is None and data["half_precision_failures"] == []
    assert "Verification: not verified" in report.to_markdown()


def test_a_failing_parity_names_provider_case_and_output():
    report = _report(parity=[_parity(logits_err=0.1, top1=0.5)])
    assert report.passed is False and report.verdict == "parity failed"
    assert report.failures == ["[cpu] b1xs8/logits: onnx error 0.1 > tolerance 1e-05, top-1 agreement 50.0%"]
    data = report.to_json()
    assert data["passed"] is False and data["parity"]["passed"] is False
    assert [c["passed"] for c in data["parity"]["cases"]] == [False]
    md = report.to_markdown()
    assert "Verification: **FAILED** (parity failed)" in md and "- b1xs8/logits: onnx error 0.1" in md
    assert "| b1xs8 | logits | 1.00e-01 | 2.50e-02 | 0.9999999 | 50.0% |" in md and "| ✗ |" in md


def test_a_generation_mismatch_fails_and_is_listed():
    parity = _parity()
    parity.generation = GenerationResult(rows=2, identical_rows=1, max_new_tokens=4, first_mismatch="row 1")
    report = _report(parity=[parity])
    assert report.passed is False and report.failures == ["[cpu] generation: row 1"]
    assert "1/2 rows identical, up to 4 new tokens" in report.to_markdown()


def test_half_precision_failures_fail_a_report_whose_parity_passed():
    lost = "bfloat16 merged: 12% of the adapter survives rounding"
    report = _report(parity=[_parity()], half=[_half(0.12)], half_failures=[lost])
    assert report.passed is False and report.verdict == "adapter lost in half precision"
    assert report.failures == [f"[half precision] {lost}"]
    data = json.loads(json.dumps(report.to_json()))
    assert data["parity"]["passed"] is True and data["half_precision_failures"] == [lost]
    assert data["half_precision"][0]["adapter_retained"] == 0.12  # a number, not "12.0%"
    md = report.to_markdown()
    assert "## Half precision (informational)" in md and f"- {lost}" in md
    # max abs (3 significant), rms, top-1, generation (none: –), max cast rel, retained
    assert "| bfloat16 | merged | 0.0123 | 0.004 | 99.0% | – | 2.50e-03 | 12.0% |" in md


def test_every_provider_is_reported_and_its_failures_prefixed():
    report = _report(parity=[_parity("cpu"), _parity("cuda", logits_err=0.1)])
    data = report.to_json()
    assert data["parity"]["provider"] == "cpu"  # the first stays where scripts read it
    assert set(data["parity_by_provider"]) == {"cpu", "cuda"}
    assert report.passed is False and all(f.startswith("[cuda] ") for f in report.failures)
    assert "## Parity (cpu)" in report.to_markdown() and "## Parity (cuda)" in report.to_markdown()


def test_parity_json_holds_numbers_and_the_tolerance_rule():
    from loraexport.verify import parity

    p = _report(parity=[_parity()]).to_json()["parity"]
    assert p["max_abs_err"] == 1e-6 and p["min_cosine"] == 0.99999994 and p["top1_agreement"] == 1.0
    assert p["generation_agreement"] == 1.0 and p["generation"]["rows"] == 2
    assert p["tolerance"]["noise_multiple"] == parity.NOISE_MULTIPLE
    assert p["tolerance"]["floor_ulps"] == parity.FLOOR_ULPS
    assert [o["output"] for o in p["cases"][0]["outputs"]] == ["logits", "present.0.key"]


def test_markdown_lists_logits_and_only_failing_other_outputs():
    md = _report(parity=[_parity()]).to_markdown()
    assert "| b1xs8 | logits |" in md and "present.0.key" not in md  # a passing cache output: json only
    assert "2 outputs compared" in md


# ---- report.json ----------------------------------------------------------------------------------
def test_json_contract_and_export_names_flattened_once():
    export = ExportResult(
        files=["encoder.onnx", "decoder.onnx"],
        opset=18,
        seconds=1.25,
        bytes=1_500_000,
        inputs={
            "encoder": ["input_ids", "attention_mask"],
            "decoder": ["input_ids", "encoder_attention_mask"],
        },
        outputs={"encoder": ["encoder_key_values.0.key"], "decoder": ["logits"]},
    )
    merge = MergeStats("float64", "float32", 0.0123, [ModuleMerge("decoder.0.self_attn.q", 0.5, 2.0)])
    data = _report(merge=merge, export=export, parity=[_parity()], latency=[_latency()]).to_json()
    assert json.loads(json.dumps(data)) == data  # plain JSON: numbers stay numbers
    assert data["schema"] == SCHEMA == 1
    assert set(data["versions"]) == {"loraexport", "torch", "onnx", "onnxruntime", "python"}
    assert data["export"]["inputs"] == ["input_ids", "attention_mask", "encoder_attention_mask"]
    assert data["export"]["outputs"] == ["encoder_key_values.0.key", "logits"]
    assert data["export"]["graphs"]["decoder"] == {
        "inputs": ["input_ids", "encoder_attention_mask"],
        "outputs": ["logits"],
    }
    assert data["merge"]["modules_merged"] == 1 and data["merge"]["seconds"] == 0.0123
    assert data["export"]["bytes"] == 1_500_000


def test_latency_json_gives_medians_spread_and_ratios():
    (case,) = _report(latency=[_latency()]).to_json()["latency"]["cases"]
    assert (case["batch"], case["seq"]) == (1, 4)
    assert case["p50"] == {"torch_unmerged": 4.0, "onnx_merged": 2.0, "onnx_base": 1.0}
    assert case["p90"]["onnx_merged"] == 3.0 and case["iqr"]["onnx_base"] == 0.125
    assert case["runs"] == {"torch_unmerged": 100, "onnx_merged": 100, "onnx_base": 100}
    assert case["ratios"] == {
        "onnx_merged/onnx_base": 2.0,
        "onnx_merged/torch_unmerged": 0.5,
        "onnx_unmerged/onnx_merged": None,  # not timed: no ratio, rather than a made-up one
    }


# ---- report.md and the summary: where numbers are formatted -----------------------------------------
def test_markdown_formats_sizes_counts_and_digests():
    weighted = dict(ADAPTER, weight=0.7)
    export = ExportResult(
        files=["model.onnx"], opset=18, seconds=1.25, bytes=1_500_000, inputs={}, outputs={}
    )
    merge = MergeStats("float64", "bfloat16", 0.0123, [ModuleMerge("q", 0.5, 2.0, 1.5e-3, 7.5e-4)])
    md = Report(BASE, [dict(ADAPTER), weighted], merge=merge, export=export).to_markdown()
    assert "- base: `runs/base` (reference, 1,234,567 parameters)" in md
    assert "(r=4, alpha=16, targets ['q', 'v'], 6 modules, sha256 0123456789ab…)" in md  # weight 1: unsaid
    assert "6 modules, weight 0.7, sha256" in md
    assert "1 modules merged in 12.3 ms; computed in float64, stored in bfloat16." in md
    assert "| `q` | 0.5 | 2 | 0.0015 | 0.00075 |" in md
    assert "Files `model.onnx`: 1.50 MB, opset 18, 1.2 s." in md  # (1.25 rounds half to even)


def test_markdown_latency_table_marks_variants_not_timed():
    md = _report(latency=[_latency()]).to_markdown()
    assert "## Latency (cpu, 1 threads, ms)" in md
    header = next(line for line in md.splitlines() if line.startswith("| batch × seq |"))
    assert header.count("|") == len(LATENCY_VARIANTS) + 4  # batch × seq, the variants, two ratios
    row = next(line for line in md.splitlines() if line.startswith("| 1 × 4 |"))
    # torch_unmerged, torch_merged (not timed), onnx_merged, onnx_base, onnx_unmerged (not timed)
    assert row == "| 1 × 4 | 4.000 (5.000) | – | 2.000 (3.000) | 1.000 (1.500) | – | 2.000 | 0.500 |"


def test_summary_rows():
    export = ExportResult(
        files=["model.onnx"], opset=18, seconds=1.25, bytes=1_500_000, inputs={}, outputs={}
    )
    merge = MergeStats("float64", "float32", 0.5, [ModuleMerge("q", 0.5, 2.0), ModuleMerge("v", 0.5, 2.0)])
    rows = dict(_report(merge=merge, export=export, parity=[_parity()], latency=[_latency()]).summary_rows())
    assert rows == {
        "base": "runs/base (reference)",
        "merged": "2 modules (float64 → float32)",
        "exported": "model.onnx (1.50 MB, opset 18, 1.2 s)",
        "parity [cpu]": "PASSED: max abs err 1.00e-06, top-1 100.0%, generation 2/2",
        "latency [cpu] 1×4": "onnx merged 2.00 ms, merged/base 2.000, vs torch unmerged 0.500",
    }


@pytest.mark.parametrize("err, word", [(1e-6, "PASSED"), (0.1, "FAILED")])
def test_summary_says_the_parity_verdict(err, word):
    rows = dict(_report(parity=[_parity(logits_err=err)]).summary_rows())
    assert rows["parity [cpu]"].startswith(f"{word}: max abs err {max(err, 1e-6):.2e}")


def test_a_parity_failure_is_a_failed_junit_case_of_its_provider():
    """What a CI system reads of a parity failure (every planted file now fails the proof first)."""
    import xml.etree.ElementTree as ET

    from loraexport.report.junit import junit_xml

    xml = junit_xml(_report(parity=[_parity(logits_err=1e-3)]), "loraexport verify x")
    failed = [c for c in ET.fromstring(xml).iter("testcase") if c.find("failure") is not None]
    assert [c.get("classname") for c in failed] == ["parity.cpu"]
    assert "tolerance" in failed[0].find("failure").get("message")
