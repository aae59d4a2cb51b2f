"""``make bench``'s prose rows (``benchmarks/bench_prose.py``): top-1 agreement with PEFT float32 and
adapter decisions kept, counted from the three top-1 arrays; the shipped text is long enough."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prose.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_prose", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


prose = _module()
# Eight positions; the adapter changes float32's top-1 at positions 1, 3, 4 and 6.
PEFT = np.array([5, 7, 9, 11, 13, 15, 17, 19])
BASE = np.array([5, 8, 9, 12, 14, 15, 18, 19])


def test_a_file_equal_to_peft_agrees_everywhere_and_keeps_every_decision():
    a = prose.agreement(PEFT, BASE, PEFT.copy())
    assert (a.positions, a.top1, a.decisions, a.kept, a.kept_share) == (8, 1.0, 4, 4, 1.0)


def test_a_file_equal_to_the_base_keeps_no_decision():
    a = prose.agreement(PEFT, BASE, BASE.copy())
    assert (a.top1, a.decisions, a.kept, a.kept_share) == (0.5, 4, 0, 0.0)


@pytest.mark.parametrize(
    ("position", "kept"),
    [(3, 3), (2, 4)],  # 3: one of the adapter's decisions lost; 2: a position the adapter left alone
)
def test_a_wrong_token_lowers_top1_and_only_a_decision_lowers_kept(position, kept):
    file = PEFT.copy()
    file[position] = 999  # neither PEFT's nor the base's token
    a = prose.agreement(PEFT, BASE, file)
    assert a.top1 == pytest.approx(7 / 8)
    assert (a.decisions, a.kept) == (4, kept)


def test_no_decision_has_no_share():
    assert prose.agreement(PEFT, PEFT.copy(), PEFT.copy()).kept_share is None


def test_arrays_of_different_lengths_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"\(8,\), \(8,\), \(7,\)"):
        prose.agreement(PEFT, BASE, PEFT[:-1])


def test_the_table_quotes_each_file_with_its_counts_and_says_why_a_row_is_missing():
    ours = {"key": "ours_int4", "label": "ours int4", "note": "", "top1": 0.758, "kept": 27, "decisions": 55}
    ours |= {"kept_share": 27 / 55, "file_bytes": 244e6, "adapter_retained": 0.993, "report_top1": 0.836}
    builder = {"key": "builder_int4", "label": "builder int4", "note": "export failed: exit 1"}
    prose_rows = {"text": "samples/real/prose.txt", "positions": 363, "decisions": 55, "wall_s": 60.0}
    model = {"label": "SmolLM2", "prose": prose_rows | {"rows": [builder, ours]}}
    md = prose.markdown({"models": [model, {"label": "GPT-2", "rows": []}]})
    assert "| builder int4 | export failed: exit 1 |" in md
    assert "| ours int4 | 75.8% | 27/55 (49%) | 244 | 99.3% (83.6%) |" in md
    assert "363 positions; the adapter changes float32's top-1 at 55" in md
    assert "GPT-2" not in md
