"""A short run of the parser fuzzer (tests/fuzz/fuzz_parsers.py), so every test run exercises it.

`make fuzz` runs it at length (100,000 inputs); here a fixed seed and a fixed number of inputs
keep it deterministic: the same inputs on every machine, however loaded. The time limit is only
a guard against a hang, far above what the inputs take.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).parent / "fuzz" / "fuzz_parsers.py"
INPUTS = 1500  # ~2.5 s on one idle core (a few dozen model and tokenizer loads)
HANG_S = 300.0  # only a hang gets near this, not a loaded machine


@pytest.fixture(scope="module")
def fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_parsers", FUZZER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fuzzer_finds_no_crash(fuzzer, tmp_path):
    stats = fuzzer.fuzz(INPUTS, HANG_S, jobs=1, seed=7, crashes=tmp_path / "crashes")
    crashes = [f"{count}x {summary} ({where})" for count, where, summary in stats.crashes.values()]
    assert not crashes, "\n".join(crashes)
    assert stats.inputs == INPUTS, stats.inputs  # all of them: only a hang stops it short
    assert set(stats.per_target) == set(fuzzer.WEIGHTS), stats.per_target  # every target reached
    assert sum(stats.accepted.values()) > 0 and sum(stats.errors.values()) > 0  # valid and invalid inputs
    assert not (tmp_path / "crashes").exists()


def test_fuzzer_reports_a_foreign_exception_as_a_crash(fuzzer, tmp_path, monkeypatch):
    """The oracle itself: a parser that lets a KeyError escape is caught and its input saved."""

    def broken(path):
        raise KeyError("dtype")

    monkeypatch.setattr(fuzzer, "read_header", broken)
    stats = fuzzer.fuzz(200, HANG_S, jobs=1, seed=7, crashes=tmp_path / "crashes")
    (count, where, summary), *_ = stats.crashes.values()
    assert summary.startswith("KeyError") and count == stats.per_target["safetensors"]
    saved = Path(where)
    assert (saved / "traceback.txt").is_file() and (saved / "model.safetensors").is_file()


def test_fuzzer_reports_a_foreign_exception_from_a_model_load(fuzzer, tmp_path, monkeypatch):
    """The model targets (reference and Hugging Face configs, tokenizer configs) go through
    ``load_model_dir``: an exception escaping it is a crash of that target, its input saved."""

    def broken(directory):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(fuzzer, "load_model_dir", broken)
    stats = fuzzer.fuzz(300, HANG_S, jobs=1, seed=7, crashes=tmp_path / "crashes")
    crashed = {sig.split(":")[0]: count for sig, (count, _, _) in stats.crashes.items()}
    assert crashed["model"] == stats.per_target["model"] > 0, (crashed, stats.per_target)
    if "hf_config" in fuzzer.WEIGHTS:
        assert crashed["hf_config"] == stats.per_target["hf_config"] > 0, (crashed, stats.per_target)


def test_fuzzer_reports_a_multi_line_message(fuzzer, tmp_path, monkeypatch):
    from loraexport.errors import ModelFormatError

    def chatty(directory):
        raise ModelFormatError(f"{fuzzer.INDEX}: bad\nand a second line")

    monkeypatch.setattr(fuzzer, "checkpoint_shards", chatty)
    stats = fuzzer.fuzz(200, HANG_S, jobs=1, seed=7, crashes=tmp_path / "crashes")
    assert any("not one line" in summary for _, _, summary in stats.crashes.values()), stats.crashes


def _main(fuzzer, tmp_path, *args: str) -> int:
    return fuzzer.main(["--jobs", "1", "--seed", "7", "--crashes", str(tmp_path / "crashes"), *args])


def test_fuzz_exits_0_when_every_input_ran_clean(fuzzer, tmp_path, capsys):
    assert _main(fuzzer, tmp_path, "--inputs", "100", "--seconds", str(HANG_S)) == 0
    assert "fuzz: 100 inputs" in capsys.readouterr().out


def test_fuzz_fails_when_the_time_limit_cuts_it_short(fuzzer, tmp_path, capsys):
    """A run that stops before --inputs proves less than it was asked to: not a pass."""
    assert _main(fuzzer, tmp_path, "--inputs", "100", "--seconds", "0") == 1
    err = capsys.readouterr().err.strip()
    assert err == "fuzz: FAILED: ran 0 of 100 inputs before the time limit (0 s)", err


def test_fuzz_fails_on_a_crash(fuzzer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fuzzer, "read_header", lambda path: {}[path])
    assert _main(fuzzer, tmp_path, "--inputs", "100", "--seconds", str(HANG_S)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fuzz: FAILED: crashes found (1 distinct)", err
