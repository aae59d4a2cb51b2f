"""Every end-of-sequence id is kept: a model whose generation_config.json lists several (Llama 3
lists three) gets all of them in ``loraexport.json`` (``model.eos_token_ids``, the first also
``special_tokens.eos``) and in ``genai_config.json`` (the list onnxruntime-genai stops at), on the
streamed path and the in-memory one alike; verification compares generated tokens up to any of
them."""

from __future__ import annotations

import json

import pytest
from artifacts import make_hf_decoder, make_peft_adapter

from loraexport.artifact.schema import check_export_meta, end_ids
from loraexport.errors import ModelFormatError
from loraexport.export.genai import GENAI_CONFIG, genai_config
from loraexport.models.hf.common import end_token_ids
from loraexport.pipeline import merge_and_export
from loraexport.verify.task import first_end, until_eos

ENDS = [2, 7, 9]


def test_end_token_ids_keep_every_id_once_in_order():
    assert end_token_ids([2, 7], 2) == [2, 7]
    assert end_token_ids(None, [5, 5, 3]) == [5, 3]
    assert end_token_ids(None, None) == []
    assert end_token_ids(True, 4) == [4]  # a bool is not an id


def test_end_ids_of_a_description():
    assert end_ids({"eos_token_ids": ENDS, "special_tokens": {"eos": 2}}) == ENDS
    assert end_ids({"special_tokens": {"eos": 2}}) == [2]  # an export written before the list
    assert end_ids({"special_tokens": {"eos": None}}) == []


@pytest.mark.parametrize("bad", [[2, "7"], 7, [2.5]])
def test_a_mistyped_list_of_end_ids_is_refused(bad):
    meta = {"model": {"kind": "causal", "special_tokens": {"eos": 2}, "eos_token_ids": bad}, "graphs": {}}
    with pytest.raises(ModelFormatError, match="eos_token_ids"):
        check_export_meta(meta, "loraexport.json", ModelFormatError)


def test_generated_tokens_are_cut_at_any_end_id():
    assert until_eos([5, 6, 9, 2, 4], ENDS) == [5, 6]
    assert until_eos([5, 6], ENDS) == [5, 6]
    assert until_eos([5, 2, 6], 2) == [5]  # one id, as before
    assert first_end([5, 7, 2], ENDS) == 1 and first_end([5], None) is None


def test_genai_config_lists_every_end_id_and_pads_with_the_first():
    model = {
        "kind": "causal", "model_type": "llama", "special_tokens": {"bos": 1, "eos": 2, "pad": None},
        "eos_token_ids": ENDS, "n_layers": 1, "attention_heads": 2, "kv_heads": 1, "head_dim": 4,
        "hidden_size": 8, "vocab_size": 96, "context_length": 64,
    }  # fmt: skip
    config = genai_config(model, {"inputs": ["input_ids", "attention_mask"], "outputs": []})["model"]
    assert config["eos_token_id"] == ENDS and config["pad_token_id"] == 2
    config = genai_config(model | {"eos_token_ids": [2]}, {"inputs": ["input_ids"], "outputs": []})["model"]
    assert config["eos_token_id"] == 2  # one id stays a number


@pytest.fixture(scope="module")
def several_ends(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ends")
    model = make_hf_decoder(tmp / "base", "llama")
    make_peft_adapter(model, tmp / "adapter", "llama")
    gen = tmp / "base" / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps(config | {"eos_token_id": ENDS}))
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [{}, {"stream": False}, {"stream": True, "quantize": "int8"}],
    ids=["default-streamed", "in-memory", "streamed-int8-proven"],
)
def test_every_end_id_reaches_the_export(several_ends, tmp_path, how):
    """The streamed int8 export is verified against the layer-streamed reference, whose proof
    holds loraexport.json's ``model`` to the checkpoint's configs: the list included."""
    out = tmp_path / "onnx"
    report = merge_and_export(several_ends / "base", several_ends / "adapter", out, latency=False, **how)
    assert report.passed is True
    model = json.loads((out / "loraexport.json").read_text())["model"]
    assert model["eos_token_ids"] == ENDS and model["special_tokens"]["eos"] == ENDS[0]
    assert json.loads((out / GENAI_CONFIG).read_text())["model"]["eos_token_id"] == ENDS


@pytest.mark.slow
def test_onnxruntime_genai_stops_at_the_second_end_id(tmp_path):
    """The list as written is what genai stops at: a token the model generates greedily, made the
    second end id, ends genai's generation there (it leaves the end token out)."""
    og = pytest.importorskip("onnxruntime_genai")
    import numpy as np

    model = make_hf_decoder(tmp_path / "base", "llama")
    make_peft_adapter(model, tmp_path / "adapter", "llama")
    prompt = [5, 17, 33, 8, 61, 41, 3]

    def greedy(directory) -> list[int]:
        m = og.Model(str(directory))
        params = og.GeneratorParams(m)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 12)
        g = og.Generator(m, params)
        g.append_tokens(np.array(prompt, dtype=np.int32))
        while not g.is_done():
            g.generate_next_token()
        return [int(t) for t in g.get_sequence(0)][len(prompt) :]

    merge_and_export(tmp_path / "base", tmp_path / "adapter", tmp_path / "free", verify_output=False)
    free = greedy(tmp_path / "free")
    stop = next(t for t in free[1:] if t != 2)  # a token generated after the first
    gen = tmp_path / "base" / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps(config | {"eos_token_id": [2, stop]}))
    merge_and_export(tmp_path / "base", tmp_path / "adapter", tmp_path / "ends", verify_output=False)
    assert greedy(tmp_path / "ends") == free[: free.index(stop)]


@pytest.mark.slow
def test_the_runtime_stops_where_peft_generate_stops(tmp_path):
    """``OnnxModel.generate_until_end`` stops each row at any end id and pads it as Hugging
    Face's ``generate`` does: PEFT's unmerged model with the base's generation_config.json
    (two end ids, the second one a token the model generates) gives the same ids and lengths."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraexport.runtime.model import OnnxModel

    model = make_hf_decoder(tmp_path / "base", "llama")
    make_peft_adapter(model, tmp_path / "adapter", "llama")
    prompts = np.array([[5, 17, 33, 8, 61, 41, 3], [9, 12, 40, 7, 22, 19, 4]])
    mask = np.ones_like(prompts)
    merge_and_export(tmp_path / "base", tmp_path / "adapter", tmp_path / "free", verify_output=False)
    free = OnnxModel(tmp_path / "free").generate(prompts, mask, 12)
    stop = int(free[0, 3])  # the first row makes it 4th: an end id from now on
    gen = tmp_path / "base" / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps(config | {"eos_token_id": [2, stop], "pad_token_id": 0}))
    merge_and_export(tmp_path / "base", tmp_path / "adapter", tmp_path / "ends", verify_output=False)
    got, lengths = OnnxModel(tmp_path / "ends").generate_until_end(prompts, mask, 12)

    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.from_numpy(prompts), attention_mask=torch.from_numpy(mask), max_new_tokens=12,
            do_sample=False,
        )  # fmt: skip
    want = out[:, prompts.shape[1] :].numpy()
    assert got.tolist() == want.tolist()
    assert lengths[0] == free[0].tolist().index(stop) + 1
