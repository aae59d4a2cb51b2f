"""merge-and-export, merge, export and verify through the real CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from clihelp import QUICK, leftovers, nothing_left, ok, previous_output, program, refused, run

from loraexport import pipeline
from loraexport.models.reference import load_model

CONTRACT_TOP = {"schema", "versions", "base", "adapters", "merge", "export", "parity", "latency"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.slow
def test_merge_and_export_subprocess(seq2seq_base, seq2seq_adapter, tmp_path):
    """The installed console script, as a user runs it."""
    out = tmp_path / "out"
    args = ["merge-and-export", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out, *QUICK]
    proc = ok(program(*args, quiet=False))
    assert "PASSED" in proc.stdout and "Traceback" not in proc.stderr
    assert "torchvision" not in proc.stderr  # third-party noise is silenced
    files = {p.name for p in out.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "loraexport.json", "report.json", "report.md"} <= files
    assert leftovers(tmp_path, "out") == []  # temp dir renamed away
    report = json.loads((out / "report.json").read_text())
    assert CONTRACT_TOP <= set(report) and report["parity"]["passed"] is True
    assert report["export"]["inputs"][:2] == ["input_ids", "attention_mask"]
    meta = json.loads((out / "loraexport.json").read_text())
    for name, digest in meta["files"].items():  # provenance: sha256 of every file written
        assert _sha(out / name) == digest, name
    assert meta["inputs"]["adapters"][0]["sha256"] == report["adapters"][0]["sha256"]


@pytest.mark.slow
def test_existing_output_needs_force(seq2seq_base, seq2seq_adapter, tmp_path):
    out = previous_output(tmp_path / "out", "keep.txt")  # --force may replace it
    args = [
        "merge-and-export",
        "--base",
        seq2seq_base,
        "--adapter",
        seq2seq_adapter,
        "--out",
        out,
        "--no-verify",
    ]
    refused(run(*args), 3, "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "loraexport.json"]
    ok(run(*args, "--force"))
    assert not (out / "keep.txt").exists() and (out / "decoder.onnx").exists()
    assert json.loads((out / "report.json").read_text())["parity"] is None  # --no-verify


@pytest.mark.slow
def test_planted_error_exits_4_and_writes_report(seq2seq_base, seq2seq_adapter, tmp_path, monkeypatch):
    real = pipeline.merged_model

    def corrupted(*args, **kwargs):
        model, stats = real(*args, **kwargs)
        with torch.no_grad():
            model.decoder[0].self_attn.q.weight[0, 0] += 0.05  # one merged weight off by ~1%
        return model, stats

    monkeypatch.setattr(pipeline, "merged_model", corrupted)
    out = tmp_path / "out"
    r = run("merge-and-export", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out, *QUICK)
    refused(r, 4, "parity failed", printed=True)
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["failures"]
    assert "FAILED" in (out / "report.md").read_text()


@pytest.mark.slow
def test_merge_export_verify_commands(causal_base, causal_adapter, tmp_path):
    merged = tmp_path / "merged"
    ok(run("merge", "--base", causal_base, "--adapter", causal_adapter, "--out", merged))
    model = load_model(merged)  # the base's layout, loadable as a plain model (strict)
    assert (merged / "merge.json").exists() and not any("lora" in k for k in model.state_dict())
    onnx_dir = tmp_path / "onnx"
    ok(run("export", "--model", merged, "--out", onnx_dir))
    assert (onnx_dir / "model.onnx").exists()
    rep = tmp_path / "verify.json"
    verify = ["verify", "--base", causal_base, "--adapter", causal_adapter, *QUICK, "--onnx"]
    ok(run(*verify, onnx_dir, "--report", rep))
    assert json.loads(rep.read_text())["parity"]["passed"] is True and rep.with_suffix(".md").exists()
    # the base exported without the adapter does not verify against the adapter
    base_onnx = tmp_path / "base-onnx"
    ok(run("export", "--model", causal_base, "--out", base_onnx))
    refused(run(*verify, base_onnx), 4, "weights differ", printed=True)  # proven: another merge


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_half_precision_records_cast_error(causal_base, causal_adapter, tmp_path, dtype):
    out = tmp_path / dtype
    r = run(
        "merge", "--base", causal_base, "--adapter", causal_adapter, "--out", out, "--dtype", dtype, "--json"
    )
    ok(r)
    stats = json.loads(r.stdout)
    assert stats["storage_dtype"] == dtype
    assert all(m["cast_max_abs_err"] > 0 for m in stats["modules"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(str(f.get_tensor(k).dtype) == f"torch.{dtype}" for k in f.keys())


def test_verify_errors(seq2seq_base, seq2seq_adapter, causal_adapter, seq2seq_onnx, tmp_path):
    r = run(
        "verify",
        "--base",
        seq2seq_base,
        "--adapter",
        seq2seq_adapter,
        "--onnx",
        tmp_path / "missing",
        "--no-latency",
    )
    refused(r, 3, "not found")
    r = run(
        "verify",
        "--base",
        seq2seq_base,
        "--adapter",
        seq2seq_adapter,
        "--onnx",
        seq2seq_onnx,
        "--provider",
        "cuda",
        "--no-latency",
    )
    if r.exit_code != 0:  # no GPU here: a clear refusal, not a silent CPU run
        refused(r, 3, "cuda")
    r = run(
        "merge-and-export",
        "--base",
        seq2seq_base,
        "--adapter",
        causal_adapter,
        "--out",
        tmp_path / "o",
        "--no-verify",
    )
    refused(r, 3)  # an adapter for another model
    nothing_left(tmp_path / "o")
