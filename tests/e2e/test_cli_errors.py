"""Every documented input error through the CLI: one line on stderr, exit 3, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from clihelp import nothing_left, ok, one_line, refused, run

FAST = ["--steps", "2", "--batch-size", "4"]


def _train(base: Path, data: Path, out: Path, *extra: str) -> Result:
    """``loraexport train`` without --quiet: an error is one line with progress messages on too."""
    return run("train", "--base", base, "--data", data, "--out", out, *FAST, *extra, quiet=False)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "adapter"


def test_missing_base_dir(tmp_path, small_data, out):
    base = tmp_path / "no-such-model"
    r = _train(base, small_data, out)
    refused(r, 3, "model directory not found", str(base))
    nothing_left(out)


def test_base_is_a_file(tmp_path, small_data, out):
    r = _train(small_data, small_data, out)
    refused(r, 3, "must be a directory")


def test_base_without_config(tmp_path, small_data, out):
    base = tmp_path / "empty-model"
    base.mkdir()
    r = _train(base, small_data, out)
    refused(r, 3, "config.json")
    nothing_left(out)


def test_base_of_unsupported_type(tmp_path, small_data, out):
    base = tmp_path / "t5"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "t5"}))
    r = _train(base, small_data, out)
    refused(r, 3, "'t5'")


def test_base_with_corrupt_weights(tmp_path, sample_base, small_data, out):
    base = tmp_path / "corrupt"
    base.mkdir()
    (base / "config.json").write_bytes((sample_base / "config.json").read_bytes())
    (base / "model.safetensors").write_bytes(b"\x00" * 64)
    r = _train(base, small_data, out)
    refused(r, 3, "model.safetensors")


def test_data_file_missing(tmp_path, sample_base, out):
    data = tmp_path / "nope.jsonl"
    r = _train(sample_base, data, out)
    refused(r, 3, "data file not found", str(data))
    nothing_left(out)


def test_eval_data_missing(tmp_path, sample_base, small_data, out):
    r = _train(sample_base, small_data, out, "--eval-data", tmp_path / "eval.jsonl")
    refused(r, 3, "eval.jsonl")


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"source": "123"}', '"target"'),
        ('{"source": "123", "target": 321}', '"target"'),
        ('["123", "321"]', '"source"'),
    ],
    ids=["not-json", "missing-target", "target-not-string", "not-an-object"],
)
def test_data_malformed_line_named_by_number(tmp_path, sample_base, small_data, out, bad_line, needle):
    lines = small_data.read_text().splitlines()
    lines.insert(6, bad_line)  # becomes line 7
    small_data.write_text("\n".join(lines) + "\n")
    r = _train(sample_base, small_data, out)
    refused(r, 3, f"{small_data}:7:", needle)
    nothing_left(out)


def test_data_empty(tmp_path, sample_base, out):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    r = _train(sample_base, data, out)
    refused(r, 3, "no examples")


def test_data_character_not_in_vocabulary(tmp_path, sample_base, small_data, out):
    """Refused before training, wherever the line is (not only if a batch happens to draw it)."""
    good = small_data.read_text().splitlines()
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("\n".join(good[:8]) + "\n")
    lines = good[8:]
    lines.insert(40, json.dumps({"source": "12x4", "target": "124x"}))  # line 41
    small_data.write_text("\n".join(lines) + "\n")
    r = _train(sample_base, small_data, out, "--eval-data", eval_data)
    refused(r, 3, "'x'", "vocabulary")
    nothing_left(out)


def test_data_longer_than_the_model_max_len(tmp_path, sample_base, small_data, out):
    """A sequence past config.max_len (32 here) is invalid input, not an internal error."""
    lines = small_data.read_text().splitlines()[:8]
    lines.append(json.dumps({"source": "1" * 40, "target": "1" * 40}))
    small_data.write_text("\n".join(lines) + "\n")
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"source": "21", "target": "12"}) + "\n")
    # the batch holds every example, so the long one is used whether or not data is checked first
    r = run(
        "train",
        "--base",
        sample_base,
        "--data",
        small_data,
        "--eval-data",
        eval_data,
        "--out",
        out,
        "--steps",
        "1",
        "--batch-size",
        "9",
        quiet=False,
    )
    refused(r, 3)
    nothing_left(out)


def test_eval_data_character_not_in_vocabulary(tmp_path, sample_base, small_data, out):
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"source": "1 2", "target": "12"}) + "\n")
    r = _train(sample_base, small_data, out, "--eval-data", eval_data)
    refused(r, 3, "' '", "vocabulary")
    nothing_left(out)


def test_output_exists_without_force_is_left_untouched(tmp_path, sample_base, small_data, out):
    out.mkdir()
    keep = out / "adapter_model.safetensors"
    keep.write_bytes(b"precious bytes \x00\x01")
    before = sorted(p.name for p in out.iterdir())
    r = _train(sample_base, small_data, out)
    refused(r, 3, "output exists", "--force")
    assert keep.read_bytes() == b"precious bytes \x00\x01"
    assert sorted(p.name for p in out.iterdir()) == before


def test_targets_matching_no_module_lists_the_linear_names(sample_base, small_data, out):
    r = _train(sample_base, small_data, out, "--targets", "nonexistent")
    line = refused(r, 3, "nonexistent")
    for name in ("q", "k", "v", "o", "fc1", "fc2", "lm_head"):
        assert name in line.split("named", 1)[-1], (name, line)
    nothing_left(out)


@pytest.mark.parametrize(
    "regex, needle", [("(q|v", "missing ), unterminated subpattern"), ("(a+)+$", "exponential time")]
)
def test_target_regex_invalid(sample_base, small_data, out, regex, needle):
    """An option's value: exit 2 naming --target-regex (was exit 3, blaming adapter_config.json)."""
    r = _train(sample_base, small_data, out, "--target-regex", regex)
    refused(r, 2, "--target-regex", needle)
    nothing_left(out)


def test_dropout_out_of_range(sample_base, small_data, out):
    r = _train(sample_base, small_data, out, "--dropout", "1.5")
    refused(r, 2, "--dropout", "1.5 is not in [0, 1)")  # the option's type, before any work


def test_eval_fraction_out_of_range(sample_base, small_data, out):
    r = _train(sample_base, small_data, out, "--eval-fraction", "0")
    refused(r, 2, "--eval-fraction", "0.0 is not in (0, 1)")


@pytest.mark.parametrize(
    "args",
    [
        ["--base", "b", "--data", "d"],  # --out missing
        ["--data", "d", "--out", "o"],  # --base missing
        ["--base", "b", "--data", "d", "--out", "o", "--rank", "0"],
        ["--base", "b", "--data", "d", "--out", "o", "--steps", "many"],
        ["--base", "b", "--data", "d", "--out", "o", "--targets", " , "],
        ["--base", "b", "--data", "d", "--out", "o", "--no-such-option"],
    ],
    ids=["no-out", "no-base", "rank-0", "steps-not-int", "empty-targets", "unknown-option"],
)
def test_usage_errors_exit_2(args):
    r = run("train", *args, quiet=False)
    line = refused(r, 2)  # click's errors too: one line, and where to read more
    assert line.endswith("(see 'main train --help')"), line


def test_unknown_command_exit_2():
    refused(run("trian"), 2, "No such command")


def test_help_lists_exit_codes():
    r = ok(run("--help"))
    assert "3 invalid input" in " ".join(r.stdout.split())


def test_data_too_small_to_hold_out(tmp_path, sample_base, small_data, out):
    small_data.write_text(small_data.read_text().splitlines()[0] + "\n")
    r = _train(sample_base, small_data, out)
    refused(r, 3, "too small")


# ---- the error contract itself ---------------------------------------------------------------
def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, small_data, out):
    r = run("--debug", "train", "--base", tmp_path / "nope", "--data", small_data, "--out", out, quiet=False)
    assert r.exit_code == 3
    assert "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_internal_error_is_exit_1_one_line(monkeypatch, sample_base, small_data, out):
    import loraexport.stages.train

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(loraexport.stages.train, "train_lora", boom)
    r = _train(sample_base, small_data, out)
    one_line(r, 1, "internal error: RuntimeError: boom", "--debug")
    nothing_left(out)


def test_interrupt_is_exit_130_and_writes_nothing(monkeypatch, sample_base, small_data, out):
    import loraexport.stages.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loraexport.stages.train, "train_lora", interrupted)
    r = _train(sample_base, small_data, out)
    assert one_line(r, 130, "interrupted: ") == "interrupted: nothing was written"
    nothing_left(out)


@pytest.mark.parametrize("where", ["--data", "--eval-data"])
def test_a_lone_surrogate_is_exit_3_with_the_line(tmp_path, sample_base, small_data, out, where):
    """JSON's ``\\ud800`` escape decodes to a lone surrogate, which no tokenizer takes: it used to
    end in exit 1 ("internal error: TypeError"), now it is the file and line (issue 26)."""
    bad = tmp_path / "bad.jsonl"
    good = small_data.read_text().splitlines()[0]
    bad.write_text(good + "\n" + '{"source": "w1 \\ud800 w2", "target": "x"}\n')
    args = (bad, out) if where == "--data" else (small_data, out, "--eval-data", bad)
    r = _train(sample_base, *args)
    refused(r, 3, f"{bad}:2", "lone surrogate")
    nothing_left(out)


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_data_that_is_no_regular_file_says_what_it_is(tmp_path, sample_base, out, kind):
    """A path that exists but is no file is named for what it is, never opened (a FIFO would block,
    /dev/zero never ends), where it used to say "data file not found"."""
    import os

    if kind == "directory":
        data, what = tmp_path / "folder", "a directory"
        data.mkdir()
    elif kind == "fifo":
        data, what = tmp_path / "fifo", "a FIFO"
        os.mkfifo(data)
    else:
        data, what = Path("/dev/zero"), "a character device"
    r = _train(sample_base, data, out)
    refused(r, 3, "data file must be a regular file", what)
    nothing_left(out)


def test_eval_data_that_is_the_training_data_is_refused(tmp_path, sample_base, small_data, out):
    """The held-out set is never the training set: the same file, by any path, is exit 2."""
    link = tmp_path / "same.jsonl"
    link.symlink_to(small_data)
    for other in (small_data, link):
        r = _train(sample_base, small_data, out, "--eval-data", other)
        refused(r, 2, "is the --data file")
    nothing_left(out)
