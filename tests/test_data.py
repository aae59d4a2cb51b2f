"""Training data files: JSON Lines parsing with line numbers, and the held-out split."""

from __future__ import annotations

import json

import pytest

from loraexport.errors import DataFormatError, InputNotFoundError
from loraexport.training.data import read_pairs, split, write_pairs

PAIRS = [(f"{i:03d}", f"{i:03d}"[::-1]) for i in range(50)]


def test_write_read_round_trip_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    write_pairs(p, PAIRS)
    p.write_text(p.read_text() + "\n  \n")
    assert read_pairs(p) == PAIRS


def test_line_numbers_count_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"source": "1", "target": "1"}) + "\n\n" + "oops\n")
    with pytest.raises(DataFormatError, match=r"d\.jsonl:3: not valid JSON"):
        read_pairs(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputNotFoundError, match="data file not found"):
        read_pairs(tmp_path / "nope.jsonl")


def test_split_is_deterministic_and_sources_disjoint():
    data = PAIRS + [(s, t + "x") for s, t in PAIRS[:10]]  # repeated sources stay on one side
    train, held = split(data, 0.2, seed=3)
    assert (train, held) == split(data, 0.2, seed=3)
    assert split(data, 0.2, seed=4) != (train, held)
    assert not {s for s, _ in train} & {s for s, _ in held}
    assert len(train) + len(held) == len(data)
    assert len({s for s, _ in held}) == 10  # 20% of 50 distinct sources


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(DataFormatError, match="eval fraction"):
        split(PAIRS, fraction, seed=0)
