"""The export stage (``stages/export.py``): the three export modes and an existing output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from artifacts import ORT_ATOL, random_batch

from loraexport.errors import OutputExistsError
from loraexport.runtime.model import OnnxModel
from loraexport.stages.export import export


@pytest.mark.slow
def test_unmerged_and_base_modes(seq2seq_base, seq2seq_adapter, seq2seq_onnx, tmp_path):
    export(seq2seq_base, tmp_path / "unmerged", adapter=seq2seq_adapter, mode="unmerged")
    export(seq2seq_base, tmp_path / "base")
    x = {k: v.numpy() for k, v in random_batch(2, 5).items()}
    merged = OnnxModel(seq2seq_onnx).forward(**x)
    unmerged = OnnxModel(tmp_path / "unmerged").forward(**x)
    base = OnnxModel(tmp_path / "base").forward(**x)
    assert np.abs(merged - unmerged).max() <= ORT_ATOL
    assert np.abs(merged - base).max() > 1e-3  # the base export really lacks the adapter
    init = lambda d: len(onnx.load(str(d / "decoder.onnx")).graph.initializer)  # noqa: E731
    assert init(tmp_path / "unmerged") > init(seq2seq_onnx)  # LoRA A and B are in that graph
    meta = json.loads((tmp_path / "base" / "loraexport.json").read_text())
    assert meta["mode"] == "base" and "adapters" not in meta["inputs"]


def test_existing_output_is_refused(seq2seq_base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export(seq2seq_base, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
