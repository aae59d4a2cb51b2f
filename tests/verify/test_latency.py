"""Latency (``verify/latency.py``): interleaved timing, and the latency part of the report."""

from __future__ import annotations

import json
import time

import pytest

from loraexport.stages.verify import verify
from loraexport.verify.latency import LatencyStats, time_interleaved


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
    stats = time_interleaved({"slow": lambda: time.sleep(0.04)}, warmup=1, min_runs=100, budget_s=0.05)
    assert stats["slow"].runs == 3  # floor_runs: 3 rounds take > 2 × budget; not 100


@pytest.mark.slow
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
