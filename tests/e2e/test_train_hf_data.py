"""``loraexport train`` on Hugging Face bases refuses data it cannot use: exit 3, one line naming
the file and the line, nothing written, inputs untouched, and no training started (every
example, held-out ones included, is checked first: ``train_hf`` here fails any test that
reaches it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from artifacts import make_hf_train_base
from clihelp import nothing_left, ok, refused, run, untouched

pytest.importorskip("transformers")

GOOD_DECODER = {"prompt": "w1 w2", "completion": "w3"}
GOOD_TEXT = {"text": "w1 w2 w3"}
GOOD_LABELLED = {"text": "w1 w2", "label": 1}
LONG = " ".join(f"w{i % 40}" for i in range(200))  # 200 tokens: over the tiny models' 128 positions


def _lines(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


# (base kind, data bytes, what the one line must name)
CASES = {
    "empty file": ("llama", b"", ["data.jsonl: no examples"]),
    "blank lines only": ("bert", b"\n  \n\n", ["data.jsonl: no examples"]),
    "a JSON array, not JSON lines": ("llama", b'[\n  {"text": "w1"}\n]\n', ["data.jsonl:1: not valid JSON"]),
    "not JSON": ("gpt2", _lines(GOOD_DECODER, b"prompt: w1"), ["data.jsonl:2: not valid JSON"]),
    "not an object": ("llama", _lines(GOOD_DECODER, ["w1", "w2"]), ["data.jsonl:2: expected a JSON object"]),
    "neither format": ("gpt2", _lines({"source": "w1", "target": "w2"}), ["data.jsonl:1: expected {"]),
    "both formats in one line": (
        "llama",
        _lines({"prompt": "w1", "completion": "w2", "text": "w3"}),
        ['data.jsonl:1: holds both "text" and "prompt"/"completion"'],
    ),
    "completion missing": (
        "llama",
        _lines(GOOD_DECODER, {"prompt": "w1"}),
        ['data.jsonl:2: missing "completion"'],
    ),
    "prompt not a string": (
        "gpt2",
        _lines({"prompt": 5, "completion": "w1"}),
        ['data.jsonl:1: "prompt" must be a string, got 5'],
    ),
    "text not a string": (
        "llama",
        _lines(GOOD_TEXT, {"text": None}),
        ['data.jsonl:2: "text" must be a string'],
    ),
    "formats mixed": (
        "llama",
        _lines(GOOD_DECODER, GOOD_DECODER, GOOD_TEXT),
        ['data.jsonl:3: a {"text": str} example in a file of {"prompt": str, "completion": str}', "(line 1)"],
    ),
    "label missing": ("bert", _lines(GOOD_LABELLED, {"text": "w1"}), ['data.jsonl:2: missing "label"']),
    "label a string": (
        "bert",
        _lines({"text": "w1", "label": "1"}),
        ['data.jsonl:1: "label" must be an integer'],
    ),
    "label a float": ("bert", _lines({"text": "w1", "label": 1.0}), ['"label" must be an integer, got 1.0']),
    "label a boolean": (
        "bert",
        _lines({"text": "w1", "label": True}),
        ['"label" must be an integer, got True'],
    ),
    "label too large": (
        "bert",
        _lines(GOOD_LABELLED, {"text": "w1", "label": 2}),
        ["data.jsonl:2: label 2 is outside [0, 2)", "head has 2 labels"],
    ),
    "label negative": (
        "bert",
        _lines({"text": "w1", "label": -1}),
        ["data.jsonl:1: label -1 is outside [0, 2)"],
    ),
    "empty completion": (
        "llama",
        _lines(GOOD_DECODER, {"prompt": "w1", "completion": ""}),
        ["data.jsonl:2: the completion gives no tokens"],
    ),
    "empty prompt, no BOS": (
        "gpt2",
        _lines({"prompt": "", "completion": "w1"}),
        ["data.jsonl:1: the prompt gives no tokens"],
    ),
    "empty text": ("llama", _lines(GOOD_TEXT, {"text": "  "}), ["data.jsonl:2: the text gives no tokens"]),
    "empty text to classify": (
        "bert",
        _lines({"text": "", "label": 0}),
        ["data.jsonl:1: the text gives no tokens"],
    ),
    "longer than the model": (
        "llama",
        _lines(GOOD_DECODER, {"prompt": LONG, "completion": "w1"}),
        ["data.jsonl:2: 203 tokens, longer than the model's 128 positions"],  # BOS, 200, w1, EOS
    ),
    "text longer than the model": (
        "gpt2",
        _lines({"text": LONG}),
        ["data.jsonl:1: 201 tokens", "or use --pack"],
    ),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {kind: make_hf_train_base(root / kind, kind) for kind in ("gpt2", "llama", "bert")}


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Training must never start on bad data: reaching it is an internal error (exit 1)."""
    import loraexport.stages.train

    def must_not_train(*args, **kwargs):
        raise AssertionError("training started before the data was checked")

    monkeypatch.setattr(loraexport.stages.train, "train_hf", must_not_train)


def _train(base: Path, data: Path, out: Path, *extra: object):
    return run("train", "--base", base, "--data", data, "--out", out, "--steps", "2", *extra)


@pytest.mark.parametrize("case", CASES)
def test_bad_training_data_is_refused_naming_the_line(bases, tmp_path, case):
    kind, raw, needles = CASES[case]
    data = tmp_path / "in" / "data.jsonl"
    data.parent.mkdir()
    data.write_bytes(raw)
    with untouched(tmp_path / "in"):
        refused(_train(bases[kind], data, tmp_path / "out"), 3, str(data.parent / "data.jsonl"), *needles)
    nothing_left(tmp_path / "out")


def test_held_out_data_is_checked_before_training_and_named(bases, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines(*[GOOD_LABELLED] * 4))
    held = tmp_path / "held.jsonl"
    held.write_bytes(_lines(GOOD_LABELLED, GOOD_LABELLED, {"text": "w1", "label": 7}))
    r = _train(bases["bert"], data, tmp_path / "out", "--eval-data", held)
    refused(r, 3, f"{held}:3: label 7 is outside [0, 2)")
    nothing_left(tmp_path / "out")


def test_held_out_data_of_another_format(bases, tmp_path):
    data, held = tmp_path / "data.jsonl", tmp_path / "held.jsonl"
    data.write_bytes(_lines(GOOD_DECODER))
    held.write_bytes(_lines(GOOD_TEXT))
    refused(
        _train(bases["llama"], data, tmp_path / "out", "--eval-data", held), 3, str(held), "format trained"
    )


def test_a_longer_max_length_than_given(bases, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines(GOOD_DECODER, GOOD_DECODER, {"prompt": "w1 w2 w3 w4 w5 w6", "completion": "w7"}))
    r = _train(bases["llama"], data, tmp_path / "out", "--max-length", "6")
    refused(r, 3, f"{data}:3: 9 tokens, longer than --max-length 6")


def test_pack_joins_plain_text_only(bases, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines(GOOD_DECODER, GOOD_DECODER))
    refused(_train(bases["llama"], data, tmp_path / "out", "--pack"), 3, "--pack joins", str(data))


def test_an_encoder_without_a_head_is_refused(tmp_path):
    import transformers
    from artifacts import word_tokenizer

    base = tmp_path / "bert-plain"
    cfg = dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(transformers.BertConfig(**cfg)).save_pretrained(base)
    word_tokenizer("bert").save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines(GOOD_LABELLED))
    r = _train(base, data, tmp_path / "out")
    refused(r, 3, "without a sequence-classification head", "BertModel", "*ForSequenceClassification")


def test_a_regression_head_is_refused(tmp_path):
    base = make_hf_train_base(tmp_path / "bert-1", "bert", num_labels=1)
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines({"text": "w1", "label": 0}))
    refused(_train(base, data, tmp_path / "out"), 3, "a head of 1 label(s)", "single-label classifiers")


def test_options_of_hugging_face_bases_are_refused_for_the_reference(sample_base, small_data, tmp_path):
    for option in (["--pack"], ["--grad-accum", "2"], ["--max-length", "16"]):
        r = _train(sample_base, small_data, tmp_path / "out", *option)
        refused(r, 3, f"{option[0]} applies to Hugging Face bases")
    nothing_left(tmp_path / "out")


def test_a_good_file_trains(bases, tmp_path, monkeypatch):
    """The same files with the bad line taken out train (the refusals above were the data's)."""
    monkeypatch.undo()
    data = tmp_path / "data.jsonl"
    data.write_bytes(_lines(*[GOOD_LABELLED, {"text": "w4", "label": 0}] * 4))
    held = tmp_path / "held.jsonl"  # --eval-data is never the --data file
    held.write_bytes(data.read_bytes())
    ok(_train(bases["bert"], data, tmp_path / "out", "--eval-data", held))
