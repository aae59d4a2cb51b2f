"""merge-and-export, merge, export and verify through the real CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loraexport import pipeline
from loraexport.cli import main
from loraexport.models.reference import load_model

CONTRACT_TOP = {"schema", "versions", "base", "adapters", "merge", "export", "parity", "latency"}


def _run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_merge_and_export_subprocess(seq2seq_base, seq2seq_adapter, tmp_path):
    """The installed console script, as a user runs it."""
    out = tmp_path / "out"
    exe = Path(sys.executable).with_name("loraexport")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "loraexport.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "merge-and-export",
            "--base",
            str(seq2seq_base),
            "--adapter",
            str(seq2seq_adapter),
            "--out",
            str(out),
            "--no-latency",
            "--samples",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "PASSED" in proc.stdout and "Traceback" not in proc.stderr
    assert "torchvision" not in proc.stderr  # third-party noise is silenced
    files = {p.name for p in out.iterdir()}
    assert {"encoder.onnx", "decoder.onnx", "loraexport.json", "report.json", "report.md"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]  # temp dir renamed away
    report = json.loads((out / "report.json").read_text())
    assert CONTRACT_TOP <= set(report) and report["parity"]["passed"] is True
    assert report["export"]["inputs"][:2] == ["input_ids", "attention_mask"]
    meta = json.loads((out / "loraexport.json").read_text())
    for name, digest in meta["files"].items():  # provenance: sha256 of every file written
        assert _sha(out / name) == digest, name
    assert meta["inputs"]["adapters"][0]["sha256"] == report["adapters"][0]["sha256"]


def test_existing_output_needs_force(seq2seq_base, seq2seq_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "loraexport.json").write_text("{}")  # a previous output: --force may replace it
    r = _run(
        "merge-and-export",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(seq2seq_adapter),
        "--out",
        str(out),
        "--no-verify",
    )
    assert r.exit_code == 3 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "loraexport.json"]
    r = _run(
        "merge-and-export",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(seq2seq_adapter),
        "--out",
        str(out),
        "--no-verify",
        "--force",
    )
    assert r.exit_code == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "decoder.onnx").exists()
    assert json.loads((out / "report.json").read_text())["parity"] is None  # --no-verify


def test_planted_error_exits_4_and_writes_report(seq2seq_base, seq2seq_adapter, tmp_path, monkeypatch):
    real = pipeline.merged_model

    def corrupted(*args, **kwargs):
        model, stats = real(*args, **kwargs)
        with torch.no_grad():
            model.decoder[0].self_attn.q.weight[0, 0] += 0.05  # one merged weight off by ~1%
        return model, stats

    monkeypatch.setattr(pipeline, "merged_model", corrupted)
    out = tmp_path / "out"
    r = _run(
        "merge-and-export",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(seq2seq_adapter),
        "--out",
        str(out),
        "--no-latency",
        "--samples",
        "2",
    )
    assert r.exit_code == 4
    last = r.stderr.strip().splitlines()[-1]  # progress lines come first
    assert last.startswith("error: parity failed") and "Traceback" not in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["failures"]
    assert "FAILED" in (out / "report.md").read_text()


def test_merge_export_verify_commands(causal_base, causal_adapter, tmp_path):
    merged = tmp_path / "merged"
    r = _run("merge", "--base", str(causal_base), "--adapter", str(causal_adapter), "--out", str(merged))
    assert r.exit_code == 0, r.stderr
    model = load_model(merged)  # the base's layout, loadable as a plain model (strict)
    assert (merged / "merge.json").exists() and not any("lora" in k for k in model.state_dict())
    onnx_dir = tmp_path / "onnx"
    r = _run("export", "--model", str(merged), "--out", str(onnx_dir))
    assert r.exit_code == 0, r.stderr
    assert (onnx_dir / "model.onnx").exists()
    rep = tmp_path / "verify.json"
    r = _run(
        "verify",
        "--base",
        str(causal_base),
        "--adapter",
        str(causal_adapter),
        "--onnx",
        str(onnx_dir),
        "--no-latency",
        "--samples",
        "2",
        "--report",
        str(rep),
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(rep.read_text())["parity"]["passed"] is True and rep.with_suffix(".md").exists()
    # the base exported without the adapter does not verify against the adapter
    base_onnx = tmp_path / "base-onnx"
    assert _run("export", "--model", str(causal_base), "--out", str(base_onnx)).exit_code == 0
    r = _run(
        "verify",
        "--base",
        str(causal_base),
        "--adapter",
        str(causal_adapter),
        "--onnx",
        str(base_onnx),
        "--no-latency",
        "--samples",
        "2",
    )
    assert r.exit_code == 4 and "parity failed" in r.stderr


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_merge_half_precision_records_cast_error(causal_base, causal_adapter, tmp_path, dtype):
    out = tmp_path / dtype
    r = _run(
        "merge",
        "--base",
        str(causal_base),
        "--adapter",
        str(causal_adapter),
        "--out",
        str(out),
        "--dtype",
        dtype,
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["storage_dtype"] == dtype
    assert all(m["cast_max_abs_err"] > 0 for m in stats["modules"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(str(f.get_tensor(k).dtype) == f"torch.{dtype}" for k in f.keys())


def test_verify_errors(seq2seq_base, seq2seq_adapter, causal_adapter, seq2seq_onnx, tmp_path):
    r = _run(
        "verify",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(seq2seq_adapter),
        "--onnx",
        str(tmp_path / "missing"),
        "--no-latency",
    )
    assert r.exit_code == 3 and "not found" in r.stderr
    r = _run(
        "verify",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(seq2seq_adapter),
        "--onnx",
        str(seq2seq_onnx),
        "--provider",
        "cuda",
        "--no-latency",
    )
    if r.exit_code != 0:  # no GPU here: a clear refusal, not a silent CPU run
        assert r.exit_code == 3 and "cuda" in r.stderr
    r = _run(
        "merge-and-export",
        "--base",
        str(seq2seq_base),
        "--adapter",
        str(causal_adapter),
        "--out",
        str(tmp_path / "o"),
        "--no-verify",
    )
    assert r.exit_code == 3 and not (tmp_path / "o").exists()  # adapter for another model
