"""A few seconds of the parser fuzzer (tests/fuzz/fuzz_parsers.py), so every test run exercises it.

`make fuzz` runs it at length (100,000 inputs); here a fixed seed and a small budget keep it
deterministic in what it tries, if not in how far it gets within the time limit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).parent / "fuzz" / "fuzz_parsers.py"
INPUTS = 3000
SECONDS = 4.0  # ~1 s for 3000 inputs on one idle core; the cap bounds a busy machine


@pytest.fixture(scope="module")
def fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_parsers", FUZZER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fuzzer_finds_no_crash(fuzzer, tmp_path):
    stats = fuzzer.fuzz(INPUTS, SECONDS, jobs=1, seed=7, crashes=tmp_path / "crashes")
    crashes = [f"{count}x {summary} ({where})" for count, where, summary in stats.crashes.values()]
    assert not crashes, "\n".join(crashes)
    assert stats.inputs >= 500, stats.inputs  # it ran for real, even on a loaded machine
    assert set(stats.per_target) == set(fuzzer.WEIGHTS), stats.per_target  # every target reached
    assert sum(stats.accepted.values()) > 0 and sum(stats.errors.values()) > 0  # valid and invalid inputs
    assert not (tmp_path / "crashes").exists()


def test_fuzzer_reports_a_foreign_exception_as_a_crash(fuzzer, tmp_path, monkeypatch):
    """The oracle itself: a parser that lets a KeyError escape is caught and its input saved."""

    def broken(path):
        raise KeyError("dtype")

    monkeypatch.setattr(fuzzer, "read_header", broken)
    stats = fuzzer.fuzz(200, SECONDS, jobs=1, seed=7, crashes=tmp_path / "crashes")
    (count, where, summary), *_ = stats.crashes.values()
    assert summary.startswith("KeyError") and count == stats.per_target["safetensors"]
    saved = Path(where)
    assert (saved / "traceback.txt").is_file() and (saved / "model.safetensors").is_file()


def test_fuzzer_reports_a_multi_line_message(fuzzer, tmp_path, monkeypatch):
    from loraexport.errors import ModelFormatError

    def chatty(directory):
        raise ModelFormatError(f"{fuzzer.INDEX}: bad\nand a second line")

    monkeypatch.setattr(fuzzer, "checkpoint_shards", chatty)
    stats = fuzzer.fuzz(200, SECONDS, jobs=1, seed=7, crashes=tmp_path / "crashes")
    assert any("not one line" in summary for _, _, summary in stats.crashes.values()), stats.crashes
