"""A quantized encoder's quality figures are read on text when its base has a tokenizer (the
reference texts, or ``--eval-data``), as a decoder's are: the tokens the model reads, special
tokens included, padding left out; random token ids only without a tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from artifacts import HF_DECODER, word_tokenizer
from clihelp import QUICK, ok, run

from loraexport.models.hf.encoder import HF_ENCODER, TEXT_BATCH
from loraexport.verify.quantized import REFERENCE_TEXTS, _cases

TEXTS = [" ".join(f"w{(7 * i + j) % 50}" for j in range(i % 5 + 1)) for i in range(TEXT_BATCH + 3)]


@pytest.fixture(scope="module")
def bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=HF_DECODER["vocab_size"], hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config).eval(), word_tokenizer("bert")


def test_an_encoder_with_a_tokenizer_is_measured_on_its_text(bert):
    model, tok = bert
    cases, what = _cases(HF_ENCODER, model, tok, TEXTS, 6, 0)
    assert what == "--eval-data text"
    assert [c.inputs["input_ids"].shape[0] for c in cases] == [TEXT_BATCH, 3]  # (B, T) batches
    rows = [r for c in cases for r in zip(c.inputs["input_ids"], c.valid, strict=True)]
    for text, (ids, valid) in zip(TEXTS, rows, strict=True):
        want = tok(text)["input_ids"]  # [CLS] words [SEP], as the model reads the text
        assert ids[valid].tolist() == want and int(valid.sum()) == len(want)
        assert (ids[~valid] == tok.pad_token_id).all()  # right padding, never compared
    assert all(torch.equal(c.valid, c.inputs["attention_mask"].bool()) for c in cases)
    # the default texts are the reference texts, cut to the model's positions (64)
    cases, what = _cases(HF_ENCODER, model, tok, None, 6, 0)
    assert what == "reference texts"
    assert sum(c.inputs["input_ids"].shape[0] for c in cases) == len(REFERENCE_TEXTS)
    assert max(c.inputs["input_ids"].shape[1] for c in cases) <= 64


def test_an_encoder_without_a_tokenizer_gets_random_ids(bert):
    model, _ = bert
    cases, what = _cases(HF_ENCODER, model, None, TEXTS, 3, 0)
    assert what == "random token ids" and len(cases) == 3


@pytest.mark.slow
def test_merge_and_export_reports_an_encoders_quality_on_text(bert, tmp_path):
    """Through the CLI: a quantized BERT with its tokenizer reports its figures on the reference
    texts, at every real token of them (the positions it counts)."""
    import peft

    model, tok = bert
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in sorted(lora.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", out,
           "--quantize", "int8", *QUICK))  # fmt: skip
    (q,) = json.loads((out / "report.json").read_text())["quantization"]
    positions = sum(len(s[:64]) for s in (tok(t)["input_ids"] for t in REFERENCE_TEXTS))
    assert q["inputs"] == "reference texts" and q["positions"] == positions, q
