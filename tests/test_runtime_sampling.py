"""How ``loraexport.runtime`` picks tokens and streams text, below the model: ``Sampling``
(temperature, top-k, top-p, seed) against the distribution it claims, and ``TextStream``'s
pieces on tokenizers whose tokens split characters (byte-level BPE) or words (WordPiece)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loraexport.runtime import RuntimeInputError, Sampling, TextStream
from loraexport.runtime.decode import argmax

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
DRAWS = 20_000
# 4 standard deviations of a frequency estimated from DRAWS draws (p(1-p) ≤ 1/4): a correct
# sampler misses it about once in 16,000 runs; a seed fixes the draws, so the test is exact.
FREQ_TOL = 4 * 0.5 / DRAWS**0.5


def _frequencies(how: Sampling, probs=PROBS) -> np.ndarray:
    logits = np.tile(np.log(probs), (DRAWS, 1)).astype(np.float32)  # (DRAWS, V): one draw per row
    ids = how.picker()(logits)
    return np.bincount(ids, minlength=len(probs)) / DRAWS


def test_temperature_1_draws_from_the_softmax():
    np.testing.assert_allclose(_frequencies(Sampling(1.0, seed=0)), PROBS, atol=FREQ_TOL)


def test_temperature_2_flattens_it():
    flat = PROBS**0.5 / (PROBS**0.5).sum()
    np.testing.assert_allclose(_frequencies(Sampling(2.0, seed=0)), flat, atol=FREQ_TOL)


def test_top_k_keeps_the_k_best_renormalized():
    want = np.array([0.5, 0.3, 0, 0]) / 0.8
    np.testing.assert_allclose(_frequencies(Sampling(1.0, top_k=2, seed=1)), want, atol=FREQ_TOL)


def test_top_p_keeps_the_fewest_whose_mass_reaches_it():
    want = np.array([0.5, 0.3, 0.15, 0]) / 0.95  # 0.5 + 0.3 < 0.9: the third is needed, not the fourth
    np.testing.assert_allclose(_frequencies(Sampling(1.0, top_p=0.9, seed=2)), want, atol=FREQ_TOL)


def test_a_seed_repeats_and_another_differs():
    logits = np.log(np.tile(PROBS, (64, 1)))
    a, b, c = (Sampling(1.0, seed=s).picker()(logits) for s in (5, 5, 6))
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("how", [Sampling(1.0, top_k=1, seed=0), Sampling(1e-30, seed=0), Sampling()])
def test_greedy_limits_choose_argmax(how):
    logits = np.random.default_rng(0).normal(size=(256, 50)).astype(np.float32)
    assert (how.picker()(logits) == argmax(logits)).all()


def test_top_k_1_takes_the_first_of_equal_best_logits_as_argmax_does():
    """A temperature near 0 draws between exactly equal best logits (their limit is a coin
    toss); top_k=1 and greedy take the first."""
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    logits[:, 3] = logits[:, 7] = logits.max(axis=1) + 1
    assert (Sampling(1.0, top_k=1, seed=0).picker()(logits) == 3).all() and (argmax(logits) == 3).all()
    assert set(Sampling(1e-30, seed=0).picker()(logits).tolist()) == {3, 7}


def test_the_sampling_values_are_checked_when_made():
    for bad, needle in [
        ({"temperature": -1}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": "7"}, "seed"),
    ]:
        with pytest.raises(RuntimeInputError, match=needle):
            Sampling(**bad)


TEXT = "héllo wörld, 日本語 🙂 — naïve café"


def _byte_level() -> Tokenizer:
    """A byte-level BPE with few merges: most characters outside ASCII span several tokens."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(["hello world, a small corpus of plain words"], trainer)
    return tk


def _word_piece() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[UNK]", "hel", "##lo", "wor", "##ld", ",", "na", "##ive"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    return tk


def _stream(tk: Tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(lambda i: tk.decode(i, skip_special_tokens=True))
    pieces = [stream.push(t) for t in ids]
    return [*pieces, stream.close()]


def test_streamed_pieces_wait_for_whole_characters():
    tk = _byte_level()
    ids = tk.encode(TEXT).ids
    pieces = _stream(tk, ids)
    assert "".join(pieces) == tk.decode(ids) == TEXT
    assert "" in pieces[:-1]  # a character's first bytes gave no piece: it waited
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_pieces_join_into_the_decode_of_any_ids():
    tk, rng = _byte_level(), np.random.default_rng(0)
    for _ in range(20):  # random bytes: invalid sequences decode to U+FFFD, in the pieces too
        ids = [int(i) for i in rng.integers(0, tk.get_vocab_size(), 40)]
        assert "".join(_stream(tk, ids)) == tk.decode(ids)
    tk = _word_piece()
    ids = tk.encode("hello world, naive").ids
    assert "".join(_stream(tk, ids)) == tk.decode(ids) == "hello world, naive"
