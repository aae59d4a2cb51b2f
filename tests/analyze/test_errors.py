"""Each documented input error of ``analyze`` and ``sweep``: one line on stderr, its exit code,
no traceback, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from artifacts import make_adapter, make_base
from click.testing import Result
from clihelp import nothing_left, refused, run


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def _analyze(base: Path, adapter: Path, out: Path, *extra: str) -> Result:
    return run("analyze", "--base", base, "--adapter", adapter, "--out", out, *extra, quiet=False)


def test_analyze_missing_adapter(tmp_path, seq2seq_base, out):
    r = _analyze(seq2seq_base, tmp_path / "nope", out)
    refused(r, 3, "adapter directory not found")
    nothing_left(out)


def test_analyze_adapter_for_another_model(tmp_path, seq2seq_base, causal_adapter, out):
    refused(_analyze(seq2seq_base, causal_adapter, out), 3, "adapter")
    nothing_left(out)


def test_analyze_compare_adapter_that_does_not_fit_the_base(tmp_path, seq2seq_base, seq2seq_adapter, out):
    wide = make_base(tmp_path / "wide", d_model=32, d_ff=64)
    other = make_adapter(wide, tmp_path / "wide-adapter")
    r = _analyze(seq2seq_base, seq2seq_adapter, out, "--compare", str(other))
    refused(r, 3, f"--compare adapter {other}:", "do not fit")
    nothing_left(out)


def test_analyze_compare_adapter_sharing_no_module(tmp_path, seq2seq_base, seq2seq_adapter, out):
    other = make_adapter(seq2seq_base, tmp_path / "k-adapter", target_modules=["k"])
    r = _analyze(seq2seq_base, seq2seq_adapter, out, "--compare", str(other))
    refused(r, 3, "adapts none of the modules of --adapter")
    nothing_left(out)


def test_analyze_output_exists(tmp_path, seq2seq_base, seq2seq_adapter):
    existing = tmp_path / "existing"
    existing.mkdir()
    refused(_analyze(seq2seq_base, seq2seq_adapter, existing), 3, "output exists", "--force")
    assert list(existing.iterdir()) == []


def _sweep(base: Path, data: Path, out: Path, *extra: str) -> Result:
    return run("sweep", "--base", base, "--data", data, "--out", out, "--steps", "1", *extra, quiet=False)


def test_sweep_budget_rank_that_does_not_split(seq2seq_base, small_data, out):
    r = _sweep(seq2seq_base, small_data, out, "--budget-rank", "6")
    refused(r, 3, "budget rank 6 cannot be split equally", "multiple of 4")
    nothing_left(out)


def test_sweep_bad_ranks_is_a_usage_error(seq2seq_base, small_data, out):
    refused(_sweep(seq2seq_base, small_data, out, "--ranks", "4,x"), 2, "--ranks")
    refused(_sweep(seq2seq_base, small_data, out, "--ranks", "0"), 2, "positive ranks")
    nothing_left(out)


def test_sweep_output_exists(tmp_path, seq2seq_base, small_data):
    existing = tmp_path / "existing"
    existing.mkdir()
    refused(_sweep(seq2seq_base, small_data, existing), 3, "output exists")


def test_sweep_bad_data_fails_before_training(tmp_path, seq2seq_base, out):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "12"}\n', encoding="utf-8")
    refused(_sweep(seq2seq_base, bad, out), 3, f"{bad}:1")
    nothing_left(out)


def test_sweep_refuses_a_hugging_face_base(tmp_path, small_data, out):
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2)
    )
    model.save_pretrained(tmp_path / "gpt2")
    r = _sweep(tmp_path / "gpt2", small_data, out)
    refused(r, 3, "supports the reference Transformer only")
    nothing_left(out)
