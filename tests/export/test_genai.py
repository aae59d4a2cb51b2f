"""onnxruntime-genai runs loraexport's decoder exports as they are: ``genai_config.json`` is
written by every decoder export, and ``onnxruntime_genai`` generates the same greedy tokens as
``loraexport.runtime`` and as PEFT's unmerged model, with no file written by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from artifacts import make_hf_decoder, make_peft_adapter

from loraexport.export.genai import GENAI_CONFIG, genai_config, portable_tokenizer_config, supported
from loraexport.pipeline import merge_and_export
from loraexport.runtime.model import OnnxModel

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
og = pytest.importorskip("onnxruntime_genai")

pytestmark = pytest.mark.slow
NEW_TOKENS = 16
EOS = 2
PROMPT = [5, 17, 33, 8, 61, 41, 3]
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2"}


def _until_eos(tokens) -> list[int]:
    """onnxruntime-genai stops at the end token and leaves it out; the others keep decoding."""
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def _genai_greedy(directory, prompt: list[int], n: int) -> list[int]:
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + n)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(prompt) :]


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "optimized"])
@pytest.mark.parametrize("family", GENAI_TYPES)
def test_onnxruntime_genai_generates_peft_tokens(family, optimize, tmp_path):
    """Plain exports (the cache concatenated) and --optimize's fused graphs (one buffer per layer
    that genai shares between past and present) alike."""
    base = make_hf_decoder(tmp_path / "base", family, **({"hidden_size": 64} if optimize else {}))
    lora = make_peft_adapter(base, tmp_path / "adapter", family)
    out = tmp_path / "onnx"
    merge_and_export(
        tmp_path / "base", tmp_path / "adapter", out, optimize=optimize, stream=False, verify_output=False
    )

    config = json.loads((out / GENAI_CONFIG).read_text())
    assert config["model"]["type"] == GENAI_TYPES[family] and config["model"]["vocab_size"] == 96
    assert config["model"]["decoder"]["num_key_value_heads"] == 2  # GQA: 4 query heads share 2
    assert config["search"]["past_present_share_buffer"] is optimize
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = lora.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(PROMPT) :].tolist()
    ours = OnnxModel(out).generate(ids.numpy(), np.ones_like(ids.numpy()), NEW_TOKENS)[0].tolist()
    theirs = _genai_greedy(out, PROMPT, NEW_TOKENS)
    assert _until_eos(ours) == _until_eos(want)  # loraexport.runtime = PEFT unmerged
    assert _until_eos(theirs) == _until_eos(want)  # onnxruntime-genai = PEFT unmerged
    assert len(_until_eos(want)) >= 4  # enough tokens to tell a wrong cache from a right one


def test_only_known_keys_are_written():
    """genai refuses any key it does not know: the config holds its keys only."""
    meta = {
        "kind": "causal",
        "model_type": "gpt2",
        "special_tokens": {"bos": 1, "eos": 2, "pad": None},
        "n_layers": 2,
        "attention_heads": 4,
        "kv_heads": 4,
        "head_dim": 8,
        "hidden_size": 32,
        "vocab_size": 96,
        "context_length": 128,
    }
    config = genai_config(meta, {"inputs": ["input_ids", "attention_mask", "position_ids"], "outputs": []})
    assert set(config) == {"model", "search"}
    assert config["model"]["type"] == "decoder"  # genai's gpt2 type wants one combined cache tensor
    assert config["model"]["pad_token_id"] == 2  # no pad token: genai pads with eos
    assert config["search"]["past_present_share_buffer"] is False  # our graphs concatenate the cache
    assert supported(meta) and not supported(meta | {"kind": "encoder"})
    assert not supported(meta | {"model_type": "loraexport-transformer"})


def test_tokenizer_class_readable_by_transformers_4():
    assert portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "x": 1}) == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "x": 1,
    }
    assert (
        portable_tokenizer_config({"tokenizer_class": "GPT2Tokenizer"})["tokenizer_class"] == "GPT2Tokenizer"
    )
