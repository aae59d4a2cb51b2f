"""Greedy rows that part where the reference's two tokens are within the logits' tolerance are
ties, not failures (``verify.generation.resolve_ties``); any wider parting stays a failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraexport.verify.generation import GenerationResult, Parted, resolve_ties
from loraexport.verify.parity import ParityResult

VOCAB = 8


def _parted(want: int, got: int) -> GenerationResult:
    g = GenerationResult(rows=2, identical_rows=1, max_new_tokens=4, first_mismatch="row 1")
    g.parted.append(Parted(np.array([1, 2, 3]), [4, 5], want, got, "row 1"))
    return g


def _logits(margin: float, seen: list):
    def logits(ids: np.ndarray) -> np.ndarray:
        seen.append(ids.tolist())
        row = np.zeros(VOCAB)
        row[3], row[6] = 1.0 + margin, 1.0  # the reference's token 3, the export's 6
        return row

    return logits


@pytest.mark.parametrize(
    "margin, tolerance, tied",
    [(4e-6, 3e-3, True), (-2e-3, 3e-3, True), (3e-3, 3e-3, True), (3.1e-3, 3e-3, False), (0.5, 3e-3, False)],
)
def test_a_parting_is_a_tie_only_within_the_tolerance(margin, tolerance, tied):
    g, seen = _parted(3, 6), []
    resolve_ties(g, _logits(margin, seen), tolerance)
    assert seen == [[1, 2, 3, 4, 5]]  # the prompt, then the reference's own tokens up to the parting
    assert g.passed is tied and g.tied_rows == int(tied)
    assert (g.first_mismatch is None) is tied
    assert (len(g.ties) == 1 and "a tie at new token 2 (3 vs 6" in g.ties[0]) is tied


def test_a_row_that_stopped_early_is_never_a_tie():
    g = _parted(3, -1)
    resolve_ties(g, _logits(0.0, []), 1.0)
    assert not g.passed and g.first_mismatch == "row 1"


def test_a_tie_passes_the_parity_and_is_reported():
    g = _parted(3, 6)
    resolve_ties(g, _logits(1e-5, []), 1e-3)
    result = ParityResult("cpu", [], g)
    assert result.passed and not result.failures


def test_compare_generation_records_where_rows_part():
    from hf_tiny import build

    from loraexport.models.hf.causal import HF_CAUSAL as family
    from loraexport.verify.generation import compare_generation

    model = build("llama")
    ids = torch.tensor([[1, 2, 3]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    want = family.generate(model, inputs, 4).numpy()
    got = want.copy()
    got[0, 2] = (got[0, 2] + 1) % 50
    g = compare_generation(family, model, [(inputs, 4)], [got], None)
    assert g.identical_rows == 0 and len(g.parted) == 1
    p = g.parted[0]
    assert p.prompt.tolist() == [1, 2, 3] and p.before == want[0, :2].tolist()
    assert (p.want, p.got) == (int(want[0, 2]), int(got[0, 2]))
