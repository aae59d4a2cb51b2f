"""``loraexport train`` end to end on the committed sample base, in-process and as a program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from loraexport.cli import main
from loraexport.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter
from loraexport.models.reference import load_model

STEPS = "10"
TRAIN_ARGS = ["--steps", STEPS, "--batch-size", "8", "--rank", "4", "--seed", "0"]
EXPECTED_FILES = {CONFIG_NAME, WEIGHTS_NAME, "training.json", "loraexport.json"}  # the last: sha256 manifest


def _program() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m loraexport.cli``."""
    script = Path(sys.executable).parent / "loraexport"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "loraexport.cli"]


def _check_adapter(out: Path, base: Path) -> Adapter:
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    adapter = Adapter.load(out)
    adapter.check_fits(load_model(base))
    assert adapter.config.r == 4 and sorted(adapter.config.target_modules) == ["q", "v"]
    assert any(b.abs().max() > 0 for _, b in adapter.weights.values())
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == int(STEPS) and training["seed"] == 0
    assert training["train_examples"] + training["eval_examples"] == 64
    return adapter


def test_train_writes_a_peft_adapter_and_json_summary(tmp_path, sample_base, small_data):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        main,
        [
            "-q",
            "train",
            "--base",
            str(sample_base),
            "--data",
            str(small_data),
            "--out",
            str(out),
            "--json",
            *TRAIN_ARGS,
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads(result.stdout)
    assert summary["steps"] == int(STEPS)
    assert summary["adapter"] == str(out)
    d, n_layers_with_qv = 128, 2 + 2 + 2  # enc self-attn, dec self-attn, dec cross-attn
    assert summary["trainable_parameters"] == n_layers_with_qv * 2 * 4 * (d + d)
    base_params = sum(p.numel() for p in load_model(sample_base).parameters())
    assert summary["base_parameters"] == base_params
    assert summary["trainable_fraction"] == summary["trainable_parameters"] / base_params
    assert 0 <= summary["eval_exact_match_before"] <= 1
    assert result.stderr == ""  # -q and not a terminal: no progress, no chatter
    _check_adapter(out, sample_base)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_train_human_output_and_force_replaces(tmp_path, sample_base, small_data):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "loraexport.json").write_text("{}")  # a previous output: --force may replace it
    args = [
        "train",
        "--base",
        str(sample_base),
        "--data",
        str(small_data),
        "--out",
        str(out),
        "--force",
        "--targets",
        "q,k,fc1",
        *TRAIN_ARGS,
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"adapter written to {out}" in result.stdout
    assert "held-out exact match" in result.stdout
    assert not (out / "stale.txt").exists()
    adapter = Adapter.load(out)
    assert {p.rsplit(".", 1)[-1] for p in adapter.weights} == {"q", "k", "fc1"}


def test_train_is_reproducible_through_the_cli(tmp_path, sample_base, small_data):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = CliRunner().invoke(
            main,
            [
                "-q",
                "train",
                "--base",
                str(sample_base),
                "--data",
                str(small_data),
                "--out",
                str(out),
                *TRAIN_ARGS,
            ],
        )
        assert result.exit_code == 0, result.output
    assert (outs[0] / WEIGHTS_NAME).read_bytes() == (outs[1] / WEIGHTS_NAME).read_bytes()


def test_console_script_trains_and_fails_cleanly(tmp_path, sample_base, small_data):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "adapter"
    ok = subprocess.run(
        [
            *_program(),
            "train",
            "--base",
            str(sample_base),
            "--data",
            str(small_data),
            "--out",
            str(out),
            "--json",
            *TRAIN_ARGS,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"] == int(STEPS)
    adapter = _check_adapter(out, sample_base)
    assert all(t.dtype == torch.float32 for pair in adapter.weights.values() for t in pair)

    bad = subprocess.run(
        [
            *_program(),
            "train",
            "--base",
            str(tmp_path / "missing"),
            "--data",
            str(small_data),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 3
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "missing" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout
    assert not (tmp_path / "x").exists()
