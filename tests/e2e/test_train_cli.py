"""``loraexport train`` end to end on the committed sample base, in-process and as a program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import nothing_left, ok, previous_output, program, refused, run

from loraexport.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter
from loraexport.models.reference import load_model

STEPS = "10"
TRAIN_ARGS = ["--steps", STEPS, "--batch-size", "8", "--rank", "4", "--seed", "0"]
EXPECTED_FILES = {CONFIG_NAME, WEIGHTS_NAME, "training.json", "loraexport.json"}  # the last: sha256 manifest


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
    result = ok(
        run("train", "--base", sample_base, "--data", small_data, "--out", out, "--json", *TRAIN_ARGS)
    )
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
    out = previous_output(tmp_path / "adapter", "stale.txt")  # --force may replace it
    args = [
        "train",
        "--base",
        sample_base,
        "--data",
        small_data,
        "--out",
        out,
        "--force",
        "--targets",
        "q,k,fc1",
    ]
    result = ok(run(*args, *TRAIN_ARGS, quiet=False))
    assert f"adapter written to {out}" in result.stdout
    assert "held-out exact match" in result.stdout
    assert not (out / "stale.txt").exists()
    adapter = Adapter.load(out)
    assert {p.rsplit(".", 1)[-1] for p in adapter.weights} == {"q", "k", "fc1"}


def test_train_is_reproducible_through_the_cli(tmp_path, sample_base, small_data):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        ok(run("train", "--base", sample_base, "--data", small_data, "--out", out, *TRAIN_ARGS))
    assert (outs[0] / WEIGHTS_NAME).read_bytes() == (outs[1] / WEIGHTS_NAME).read_bytes()


@pytest.mark.slow
def test_console_script_trains_and_fails_cleanly(tmp_path, sample_base, small_data):
    out = tmp_path / "adapter"
    args = ["train", "--base", sample_base, "--data", small_data, "--out", out, "--json", *TRAIN_ARGS]
    trained = ok(program(*args, env={"HF_HUB_OFFLINE": "1"}, quiet=False))
    assert json.loads(trained.stdout)["steps"] == int(STEPS)
    adapter = _check_adapter(out, sample_base)
    assert all(t.dtype == torch.float32 for pair in adapter.weights.values() for t in pair)

    missing = tmp_path / "missing"
    args = ["train", "--base", missing, "--data", small_data, "--out", tmp_path / "x"]
    refused(program(*args, env={"HF_HUB_OFFLINE": "1"}, quiet=False), 3, str(missing))
    nothing_left(tmp_path / "x")
