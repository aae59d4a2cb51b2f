"""Reference model I/O, tokenisation and greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from artifacts import edit_json
from safetensors.torch import load_file, save_file

from loraexport.errors import (
    DataFormatError,
    InputNotFoundError,
    InvalidInputError,
    ModelFormatError,
)
from loraexport.models.reference import (
    BOS,
    EOS,
    PAD,
    SEP,
    WEIGHTS,
    Vocab,
    batch_encode,
    greedy_generate,
    load_model,
    prompt_ids,
    save_model,
)
from loraexport.models.registry import detect_family, load_base
from loraexport.models.transformer import Transformer

SAMPLE_BASE = Path(__file__).resolve().parents[2] / "samples" / "base"
MODES = {
    "encoder-decoder": dict(n_encoder_layers=2, n_decoder_layers=2),
    "decoder-only": dict(n_encoder_layers=0, n_decoder_layers=2),
}


@torch.no_grad()
def _naive_greedy(model: Transformer, source: str, max_new: int) -> list[int]:
    """Full recomputation at every step, one example at a time: no cache, no batching."""
    vocab = Vocab(model.config.vocab)
    src = torch.tensor([vocab.encode(source) + [EOS]])
    out: list[int] = []
    for _ in range(max_new):
        if model.config.is_encoder_decoder:
            logits = model(src, torch.ones_like(src), torch.tensor([[BOS] + out]))
        else:
            logits = model(torch.tensor([[BOS] + vocab.encode(source) + [SEP] + out]))
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generate_equals_naive_loop_tiny(mode, make_model):
    model = make_model(**MODES[mode])
    sources = ["3141", "5926", "5358"]  # equal lengths: decoder-only prompts must be
    got = greedy_generate(model, prompt_ids(model.config, sources), 8)
    assert got.shape == (3, 8)
    for row, src in zip(got.tolist(), sources, strict=True):
        assert row == _naive_greedy(model, src, 8), src


def test_greedy_generate_equals_naive_loop_sample_base_mixed_lengths():
    model = load_model(SAMPLE_BASE)
    sources = ["93296", "79647670", "12", "5550123"]  # padded batch of different lengths
    got = greedy_generate(model, prompt_ids(model.config, sources), 10)
    vocab = Vocab(model.config.vocab)
    for row, src in zip(got.tolist(), sources, strict=True):
        assert row == _naive_greedy(model, src, 10), src
        assert vocab.decode(row) == src[::-1]  # the sample base was pre-trained to reverse


def test_save_load_round_trip_bit_identical(tmp_path, make_model):
    model = make_model(**MODES["decoder-only"])
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "again").mkdir()
    save_model(loaded, tmp_path / "again")
    assert (tmp_path / WEIGHTS).read_bytes() == (tmp_path / "again" / WEIGHTS).read_bytes()


def test_load_base_detects_reference_family():
    family, model = load_base(SAMPLE_BASE)
    assert isinstance(model, Transformer) and not model.training
    name = getattr(family, "name", family)  # a family object (or, earlier, its name)
    assert "reference" in name
    detected = detect_family(SAMPLE_BASE)
    assert getattr(detected, "name", detected) == name


@pytest.fixture
def model_dir(tmp_path, make_model) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_model(make_model(), d)
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(InputNotFoundError, match="nope"):
        load_model(tmp_path / "nope")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(model_dir)


@pytest.mark.parametrize("text", ["{", "[1, 2]", '"x"'])
def test_config_not_a_json_object(model_dir, text):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(ModelFormatError, match="config.json"):
        load_model(model_dir)


def test_wrong_model_type(model_dir):
    edit_json(model_dir / "config.json", model_type="t5")
    with pytest.raises(ModelFormatError, match="model_type"):
        load_model(model_dir)
    with pytest.raises(ModelFormatError, match="t5"):
        load_base(model_dir)


def test_missing_weights(model_dir):
    (model_dir / WEIGHTS).unlink()
    with pytest.raises(ModelFormatError, match=WEIGHTS):
        load_model(model_dir)


def test_corrupt_weights(model_dir):
    data = (model_dir / WEIGHTS).read_bytes()
    (model_dir / WEIGHTS).write_bytes(data[:100])
    with pytest.raises(ModelFormatError, match=WEIGHTS):
        load_model(model_dir)


def test_shapes_do_not_match_config(model_dir):
    edit_json(model_dir / "config.json", d_ff=48)
    with pytest.raises(ModelFormatError, match="does not match config.json"):
        load_model(model_dir)


def test_tensor_missing_from_weights(model_dir):
    tensors = load_file(str(model_dir / WEIGHTS))
    del tensors["lm_head.bias"]
    save_file(tensors, str(model_dir / WEIGHTS))
    with pytest.raises(ModelFormatError, match="lm_head.bias"):
        load_model(model_dir)


def test_unknown_config_key(model_dir):
    edit_json(model_dir / "config.json", rope_theta=10000)
    with pytest.raises(ModelFormatError, match="rope_theta"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "changes",
    [dict(n_heads=3), dict(d_model="16"), dict(n_heads=0), dict(max_len=-1), dict(d_model=-16)],
    ids=["indivisible", "string", "zero-heads", "negative-max-len", "negative-d-model"],
)
def test_invalid_config_values_are_model_format_errors(model_dir, changes):
    """A malformed config.json is invalid input (exit 3), never an internal error (exit 1)."""
    edit_json(model_dir / "config.json", **changes)
    with pytest.raises(ModelFormatError):
        load_model(model_dir)


# ---- tokenisation ------------------------------------------------------------------------------
def test_vocab_encode_decode(make_config):
    vocab = Vocab(make_config().vocab)
    ids = vocab.encode("0912")
    assert ids == [4, 13, 5, 6]
    assert vocab.decode(ids + [EOS, 7]) == "0912"  # stops at <eos>
    assert vocab.decode([BOS, PAD, SEP] + ids) == "0912"  # specials are not text
    with pytest.raises(DataFormatError, match="'x'"):
        vocab.encode("01x")
    with pytest.raises(ModelFormatError):
        Vocab(["a", "b"])


def test_batch_encode_encoder_decoder(make_config):
    b = batch_encode(make_config(), [("12", "21"), ("345", "5")])
    assert b["input_ids"].tolist() == [[5, 6, EOS, PAD], [7, 8, 9, EOS]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["decoder_input_ids"].tolist() == [[BOS, 6, 5], [BOS, 9, PAD]]
    assert b["labels"].tolist() == [[6, 5, EOS], [9, EOS, -100]]


def test_batch_encode_decoder_only(make_config):
    b = batch_encode(make_config(n_encoder_layers=0), [("12", "21"), ("3", "")])
    assert b["input_ids"].tolist() == [[BOS, 5, 6, SEP, 6, 5], [BOS, 7, SEP, PAD, PAD, PAD]]
    # labels are the next token: nothing is learnt on the prompt
    assert b["labels"].tolist() == [
        [-100, -100, -100, 6, 5, EOS],
        [-100, -100, EOS, -100, -100, -100],
    ]
    assert "decoder_input_ids" not in b


def test_prompt_ids(make_config):
    enc = prompt_ids(make_config(), ["12", "3"])
    assert enc["input_ids"].tolist() == [[5, 6, EOS], [7, EOS, PAD]]
    dec = prompt_ids(make_config(n_encoder_layers=0), ["12", "34"])
    assert dec["input_ids"].tolist() == [[BOS, 5, 6, SEP], [BOS, 7, 8, SEP]]
    with pytest.raises(ValueError, match="equal length"):
        prompt_ids(make_config(n_encoder_layers=0), ["12", "3"])


def test_errors_are_invalid_input():
    assert issubclass(ModelFormatError, InvalidInputError)
    assert issubclass(InputNotFoundError, InvalidInputError)
    assert ModelFormatError.exit_code == InputNotFoundError.exit_code == 3


def test_sample_base_is_committed_and_loads():
    assert (SAMPLE_BASE / "config.json").is_file()
    model = load_model(SAMPLE_BASE)
    assert model.config.is_encoder_decoder
    assert model.config.vocab[4:] == list("0123456789")
