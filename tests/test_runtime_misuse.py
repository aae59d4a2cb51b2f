"""``loraexport.runtime`` refuses misuse with its own error (``RuntimeInputError``: a ValueError
and an ``InvalidInputError``), before any onnxruntime call, on every graph kind: the reference
decoder (a growing cache) and a Hugging Face decoder's fused graph (a shared buffer). Each case
was answered before with a silent wrong answer or someone else's error (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest
from artifacts import make_hf_decoder

from loraexport.errors import InvalidInputError
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.stages.export import export

ONE = np.ones((1, 2), np.int64)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("misuse")
    make_hf_decoder(tmp / "base", "llama")  # vocabulary 96
    export(tmp / "base", tmp / "onnx")  # the default: the fused graph, written from the checkpoint
    return OnnxModel(tmp / "onnx")


@pytest.fixture(params=["reference", "fused"])
def model(request, causal_onnx):
    return OnnxModel(causal_onnx) if request.param == "reference" else request.getfixturevalue("fused")


def _vocab(model: OnnxModel) -> int:
    m = model.meta["model"]
    return m["vocab_size"] if "vocab_size" in m else len(m["vocab"])


def _context(model: OnnxModel) -> int:
    m = model.meta["model"]
    return m.get("context_length", m.get("max_len"))


CASES = {
    "negative id": (lambda m: (np.array([[5, -1]]), ONE), "id -1, outside the vocabulary"),
    "id past the vocabulary": (lambda m: (np.array([[5, _vocab(m)]]), ONE), "outside the vocabulary"),
    "float ids": (lambda m: (np.array([[5.7, 6.2]]), ONE), "must hold integer token ids"),
    "1-D ids": (lambda m: (np.array([5, 6]), np.ones(2)), r"must be \(batch, tokens\)"),
    "3-D ids": (lambda m: (np.ones((1, 2, 2), np.int64), np.ones((1, 2, 2))), r"must be \(batch, tokens\)"),
    "no tokens": (lambda m: (np.zeros((1, 0), np.int64), np.zeros((1, 0))), "a token or more"),
    "mask of another shape": (lambda m: (np.array([[5, 6]]), np.ones((1, 3))), "must be input_ids' shape"),
    "mask of other values": (lambda m: (np.array([[5, 6]]), np.array([[1, 2]])), "0 and 1 only"),
    "past the context": (
        lambda m: (np.full((1, _context(m) + 1), 5), np.ones((1, _context(m) + 1))),
        "the model's context is",
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("call", ["forward", "forward_all", "generate"])
def test_misuse_is_refused_before_onnxruntime_runs(model, case, call, monkeypatch):
    make, needle = CASES[case]
    ids, mask = make(model)
    for session in model.sessions.values():  # any onnxruntime call would fail the test
        monkeypatch.setattr(session, "run", lambda *a, **k: pytest.fail("onnxruntime ran"), raising=False)
        monkeypatch.setattr(
            session, "run_with_iobinding", lambda *a, **k: pytest.fail("onnxruntime ran"), raising=False
        )
    args = (ids, mask, 2) if call == "generate" else (ids, mask)
    with pytest.raises(RuntimeInputError, match=needle) as e:
        getattr(model, call)(*args)
    assert isinstance(e.value, ValueError) and isinstance(e.value, InvalidInputError)


def test_a_negative_number_of_new_tokens_is_refused(model):
    with pytest.raises(RuntimeInputError, match="max_new_tokens must be 0 or more, not -5"):
        model.generate(np.array([[5, 6]]), ONE, -5)


def test_prompt_and_new_tokens_past_the_context_are_refused(model):
    n = _context(model)
    with pytest.raises(RuntimeInputError, match="exceed the model's context_length"):
        model.generate(np.array([[5, 6]]), ONE, n)


def test_honest_calls_still_run(model):
    ids = np.array([[5, 6, 7]])
    assert model.generate(ids, np.ones((1, 3)), 2).shape == (1, 2)  # a float mask of 0/1 is fine
    assert np.isfinite(model.forward(ids, np.ones((1, 3), np.int64))).all()
