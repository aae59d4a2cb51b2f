"""train_lora: deterministic under a seed, base untouched, parameter counts right."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_BASE, SORT_TRAIN

from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import lora_layers
from loraexport.models.reference import load_model
from loraexport.training.data import read_pairs
from loraexport.training.loop import count_parameters, exact_match, train_lora

STEPS = 20
# 30 LoRA steps on sorting from a reversal base: the mean loss of the last 5 steps falls below
# this fraction of the first 5 (measured 0.18 with seed 0; a LoRA branch that does not train
# leaves the ratio near 1), so the margin absorbs platform differences.
LOSS_DROP = 0.5
SOURCES = "3141 5926 5358 9793 2384 6264 3383 2795 0288 4197 1693 9937 5105 8209".split()
PAIRS = [(s, "".join(sorted(s))) for s in SOURCES]
EVAL = PAIRS[:4]


def _train(make_model, seed: int = 0, dropout: float = 0.1, mode: str = "encoder-decoder"):
    layers = dict(n_encoder_layers=0) if mode == "decoder-only" else {}
    model = make_model(**layers)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=dropout)
    adapter, result = train_lora(
        model,
        config,
        PAIRS,
        EVAL,
        steps=STEPS,
        lr=1e-2,
        batch_size=4,
        seed=seed,
        show_progress=False,
    )
    return model, adapter, result


@pytest.mark.parametrize("mode", ["encoder-decoder", "decoder-only"])
def test_training_is_deterministic_under_a_seed(mode, make_model):
    _, first, r1 = _train(make_model, mode=mode)
    _, second, r2 = _train(make_model, mode=mode)
    assert first.weights.keys() == second.weights.keys()
    for path, (a, b) in first.weights.items():
        assert torch.equal(a, second.weights[path][0]), path
        assert torch.equal(b, second.weights[path][1]), path
    assert r1.losses == r2.losses
    assert (r1.eval_before, r1.eval_after) == (r2.eval_before, r2.eval_after)


def test_another_seed_gives_another_adapter(make_model):
    _, first, _ = _train(make_model, seed=0)
    _, other, _ = _train(make_model, seed=1)
    path = next(iter(first.weights))
    assert not torch.equal(first.weights[path][1], other.weights[path][1])


def test_training_moves_b_and_leaves_base_bit_identical(make_model):
    before = make_model().state_dict()
    model, adapter, result = _train(make_model)
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(b.abs().max() > 0 for _, b in adapter.weights.values())  # B left its zero init
    for path, layer in lora_layers(model).items():  # the adapter is what the model holds
        assert torch.equal(layer.lora_B, adapter.weights[path][1])
    assert result.steps == STEPS == len(result.losses)
    assert result.final_loss == result.losses[-1]
    assert not model.training


def test_trainable_fraction(make_model):
    model, adapter, result = _train(make_model)
    d, r = 16, 4
    wrapped = [
        "encoder.0.self_attn.q",
        "encoder.0.self_attn.v",
        "decoder.0.self_attn.q",
        "decoder.0.self_attn.v",
        "decoder.0.cross_attn.q",
        "decoder.0.cross_attn.v",
    ]
    assert sorted(adapter.weights) == sorted(wrapped)
    expected_trainable = len(wrapped) * r * (d + d)
    assert result.trainable_parameters == expected_trainable == adapter.num_parameters
    assert result.trainable_parameters == count_parameters(model, trainable_only=True)
    base = sum(p.numel() for p in make_model().parameters())
    assert result.base_parameters == base
    assert result.trainable_fraction == pytest.approx(expected_trainable / base, rel=1e-15)


def test_eval_before_is_the_base_and_after_is_the_adapted_model(make_model):
    model, _, result = _train(make_model, dropout=0.0)
    assert result.eval_before == exact_match(make_model(), EVAL)
    assert result.eval_after == exact_match(model, EVAL)


def test_lora_learns_a_new_task_on_the_sample_base():
    """Sorting, on a base pre-trained to reverse: the training loss must fall well below start."""
    pairs = read_pairs(SORT_TRAIN)[:256]
    model = load_model(SAMPLE_BASE)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"])
    _, result = train_lora(
        model, config, pairs, None, steps=30, lr=3e-3, batch_size=32, seed=0, show_progress=False
    )
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < LOSS_DROP * first, (first, last)
