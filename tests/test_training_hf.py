"""The pieces of training on Hugging Face bases: batches and where the loss is, packing, the
held-out split, greedy exact match, the warm-up, and the numbers the Python API refuses."""

from __future__ import annotations

import pytest
import torch

from loraexport.errors import InvalidInputError
from loraexport.training.data_hf import CAUSAL, CLASSIFY, Example, Record, pack, split
from loraexport.training.hf import IGNORE, Task, collate, exact_match
from loraexport.training.loop import warmup_steps

PAD, EOS = 0, 2
DECODER = Task(CAUSAL, PAD, eos_id=EOS)


def test_collate_puts_the_loss_on_the_completion_only():
    rows = [Example(1, (1, 5, 6, 7, EOS), prompt=3), Example(2, (8, 9, EOS))]  # a prompt; a text
    batch = collate(rows, DECODER)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, EOS], [8, 9, EOS, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    no = IGNORE  # position t is predicted from t-1: not the prompt, not a text's first token, not padding
    assert batch["labels"].tolist() == [[no, no, no, 7, EOS], [no, 9, EOS, no, no]]


def test_collate_for_a_classifier():
    batch = collate([Example(1, (2, 5, 3), label=1), Example(2, (2, 3), label=0)], Task(CLASSIFY, PAD))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, PAD]]


def test_pack_cuts_the_stream_into_rows_named_by_their_first_line():
    examples = [Example(1, (10, 11, EOS)), Example(2, (12, EOS)), Example(4, (13, 14, 15, 16, EOS))]
    rows = pack(examples, 4)
    assert [r.ids for r in rows] == [(10, 11, EOS, 12), (EOS, 13, 14, 15), (16, EOS)]
    assert [r.line for r in rows] == [1, 2, 4]
    assert [r.ids for r in pack(examples, 9)] == [
        (10, 11, EOS, 12, EOS, 13, 14, 15, 16)
    ]  # EOS of one token dropped


def test_split_keeps_every_copy_of_a_prompt_on_one_side():
    records = [Record(n, {"prompt": f"p{n % 5}", "completion": "c"}) for n in range(1, 41)]
    examples = [Example(r.line, (1, 2), prompt=1) for r in records]
    train, held = split(records, examples, 0.2, seed=0)
    prompt = {e.line: records[e.line - 1].fields["prompt"] for e in examples}
    assert {prompt[e.line] for e in train}.isdisjoint({prompt[e.line] for e in held})
    assert len(train) + len(held) == 40 and len(held) == 8  # one prompt of five, eight copies
    assert split(records, examples, 0.2, seed=0) == (train, held)


def test_exact_match_needs_every_completion_token_and_eos():
    examples = [
        Example(1, (1, 5, 7, EOS), prompt=2),  # generated exactly: a match
        Example(2, (1, 6, 8, EOS), prompt=2),  # right tokens, no EOS after them: no match
        Example(3, (1, 5, 6, 9, EOS), prompt=3),  # another prompt length (its own batch): a match
    ]
    answers = {(1, 5): [7, EOS], (1, 6): [8, 8], (1, 5, 6): [9, EOS]}
    calls = []

    def generate(model, inputs, max_new):
        calls.append(tuple(inputs["input_ids"].shape))
        assert bool(inputs["attention_mask"].all())  # batched by length: no padding
        return torch.tensor([answers[tuple(row)][:max_new] for row in inputs["input_ids"].tolist()])

    task = Task(CAUSAL, PAD, eos_id=EOS, generate=generate)
    assert exact_match(None, examples, task, batch_size=8) == pytest.approx(2 / 3)
    assert sorted(calls) == [(1, 3), (2, 2)]


@pytest.mark.parametrize(
    "steps, warmup, expected", [(600, 0.05, 30), (10, 0.05, 1), (100, 0.0, 1), (100, 0.25, 25), (100, 40, 40)]
)
def test_warmup_steps(steps, warmup, expected):
    assert warmup_steps(steps, warmup) == expected


def test_default_warmup_is_what_the_reference_training_always_had():
    assert all(warmup_steps(s, 0.05) == max(1, s // 20) for s in range(1, 100_000))


@pytest.mark.parametrize(
    "option, value",
    [("warmup", 1.5), ("warmup", -0.1), ("grad_accum", 0), ("max_length", 1), ("lr", float("nan"))],
)
def test_numbers_the_python_api_refuses(tmp_path, option, value):
    from loraexport.stages.train import train

    with pytest.raises(InvalidInputError, match=f"{option} .* cannot be used for training"):
        train(tmp_path / "base", tmp_path / "data.jsonl", tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()
