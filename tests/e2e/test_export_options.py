"""``--opset`` and ``--dtype`` through the CLI: what an exporter cannot write, and half
precision that cannot apply or that loses the adapter, are refused in one line."""

from __future__ import annotations

import json

import pytest
from clihelp import QUICK, needs_bin, nothing_left, program, refused, run, untouched

from loraexport.lora.adapter import Adapter


def test_cli_refuses_an_opset_of_the_other_exporter(causal_base, tmp_path):
    with untouched(tmp_path):
        r = run(
            "export",
            "--model",
            causal_base,
            "--exporter",
            "torchscript",
            "--opset",
            21,
            "--out",
            tmp_path / "x",
        )
        refused(r, 3, "opset 21", "torchscript", "18 to 20")


@needs_bin
def test_hf_model_with_an_opset_torchscript_cannot_write_prints_one_line(tmp_path):
    """A Hugging Face model exports with TorchScript by default; it used to fail (exit 1) after
    printing its whole IR graph on fd 1. A real process: that output bypassed sys.stdout."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with untouched(tmp_path):
        r = program("export", "--model", tmp_path / "gpt2", "--opset", 21, "--out", tmp_path / "out")
        refused(r, 3, "opset 21", "torchscript")


def test_half_dtype_with_unmerged_mode_is_refused(causal_base, causal_adapter, tmp_path):
    out = tmp_path / "out"
    r = run(
        "export",
        "--model",
        causal_base,
        "--adapter",
        causal_adapter,
        "--out",
        out,
        "--mode",
        "unmerged",
        "--dtype",
        "float16",
    )
    refused(r, 3, "does not apply to --mode unmerged")
    nothing_left(out)


@pytest.mark.slow
def test_adapter_lost_to_rounding_fails_verification(causal_base, causal_adapter, tmp_path):
    """A ΔW far below bfloat16's spacing of W rounds away: the file is exact against its rounded
    weights, and useless; verification must say so (exit 4), not pass."""
    tiny = Adapter.load(causal_adapter)
    tiny.weights = {p: (a, b * 1e-6) for p, (a, b) in tiny.weights.items()}
    (tmp_path / "tiny").mkdir()
    tiny.save(tmp_path / "tiny")
    out = tmp_path / "out"
    r = run(
        "merge-and-export",
        "--base",
        causal_base,
        "--adapter",
        tmp_path / "tiny",
        "--out",
        out,
        "--dtype",
        "bfloat16",
        *QUICK,
    )
    refused(r, 4, "adapter lost in half precision", "survives rounding", printed=True)
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["parity"]["passed"] is True  # exact, and still refused
    merged = next(h for h in report["half_precision"] if h["variant"] == "merged")
    assert merged["adapter_retained"] < 0.5
