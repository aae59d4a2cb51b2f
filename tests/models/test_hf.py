"""Hugging Face families against PEFT as the oracle, on tiny random models built from configs.

For GPT-2, Llama, Mistral, Qwen2, BERT and RoBERTa: our merged weights equal PEFT's
``merge_and_unload()``; the exported ONNX equals PEFT's unmerged model; greedy decoding of
32 tokens through onnxruntime's KV cache equals PEFT's ``generate``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from clihelp import nothing_left, refused, run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraexport.lora.adapter import Adapter  # noqa: E402
from loraexport.models.registry import load_base  # noqa: E402
from loraexport.pipeline import merge_and_export  # noqa: E402
from loraexport.runtime.model import OnnxModel, RuntimeInputError, positions  # noqa: E402
from loraexport.stages.merge import merged_model  # noqa: E402

# Merged weights vs PEFT: both add s·B·A to W0 once; ours in float64 then rounded, PEFT's in
# float32, so they differ by about one float32 rounding (6e-8 relative); 1e-6 is the contract.
MERGE_REL_TOL = 1e-6
# ONNX vs PEFT unmerged, float32 logits of O(0.1-1) on width-32 models: a few roundings.
LOGITS_ATOL = 1e-4
NEW_TOKENS = 32
B_STD = 0.3

VOCAB = 96
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    vocab_size=VOCAB,
)
MODELS = {
    "gpt2": (
        lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=128,
                bos_token_id=1,
                eos_token_id=2,
            )
        ),
        ["c_attn"],
    ),
    "llama": (
        lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **SMALL, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0
            )
        ),
        ["q_proj", "v_proj"],
    ),
    "mistral": (
        lambda: transformers.MistralForCausalLM(
            transformers.MistralConfig(
                **SMALL, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, sliding_window=None
            )
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "qwen2": (
        lambda: transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**SMALL, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
        ),
        ["q_proj", "v_proj", "gate_proj", "down_proj"],
    ),
    "bert": (
        lambda: transformers.BertModel(
            transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=128,
            )
        ),
        ["query", "value"],
    ),
    "roberta": (
        lambda: transformers.RobertaModel(
            transformers.RobertaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=130,
                pad_token_id=1,
            )
        ),
        ["query", "key", "value", "dense"],
    ),
}
DECODERS = ("gpt2", "llama", "mistral", "qwen2")


def _randomize_b(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)


@pytest.fixture(scope="module", params=list(MODELS))
def hf_case(request, tmp_path_factory):
    """(name, base dir, adapter dir, PEFT model with the adapter, unmerged)."""
    name = request.param
    build, targets = MODELS[name]
    torch.manual_seed(0)
    base = build().eval()
    root = tmp_path_factory.mktemp(name)
    base.save_pretrained(root / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=name == "gpt2")
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomize_b(peft_model, seed=1)
    peft_model.save_pretrained(root / "adapter")
    return name, root / "base", root / "adapter", peft_model.eval()


@pytest.fixture(scope="module")
def hf_export(hf_case, tmp_path_factory):
    """merge-and-export of ``hf_case`` (parity verified on 3 cases, no latency): (report, out dir)."""
    _, base_dir, adapter_dir, _ = hf_case
    out = tmp_path_factory.mktemp("export") / "out"
    return merge_and_export(base_dir, adapter_dir, out, samples=3, latency=False, stream=False), out


def test_merged_weights_equal_peft(hf_case):
    name, base_dir, adapter_dir, peft_model = hf_case
    _, base = load_base(base_dir)
    ours, stats = merged_model(base, [Adapter.load(adapter_dir)])
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert stats.modules_merged > 0
    for key, w in ours.state_dict().items():
        ref = theirs[key]
        err = float((w.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
        assert err <= MERGE_REL_TOL, (key, err)
    changed = [k for k, w in ours.state_dict().items() if not torch.equal(w, base.state_dict()[k])]
    assert len(changed) == stats.modules_merged  # exactly the adapted weights moved


def _inputs(vocab: int, batch: int = 3, seq: int = 12, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # right padding in one row
    return ids, mask


def test_onnx_equals_peft_unmerged(hf_case, hf_export):
    name, _, _, peft_model = hf_case
    report, out_dir = hf_export
    assert report.passed, report.failures
    onnx = OnnxModel(out_dir)
    ids, mask = _inputs(VOCAB)
    with torch.no_grad():
        kw = {"input_ids": ids, "attention_mask": mask}
        if name in DECODERS:
            kw["position_ids"] = torch.from_numpy(positions(mask.numpy()))
        out = peft_model(**kw)
    want = (out.logits if name in DECODERS else out.last_hidden_state).numpy()
    got = onnx.forward(ids.numpy(), mask.numpy())
    valid = mask.numpy().astype(bool)
    assert np.abs(got[valid] - want[valid]).max() <= LOGITS_ATOL
    if name in DECODERS:
        assert (got[valid].argmax(-1) == want[valid].argmax(-1)).all()  # top-1 agreement 100%
        meta = json.loads((out_dir / "loraexport.json").read_text())
        assert meta["graphs"]["model"]["inputs"][:4] == [
            "input_ids",
            "attention_mask",
            "position_ids",
            "past_key_values.0.key",
        ]
        assert meta["graphs"]["model"]["outputs"][:2] == ["logits", "present.0.key"]
        assert report.parity[0].generation.rows > 0


def test_generation_equals_peft_generate(hf_case, hf_export):
    name, _, _, peft_model = hf_case
    onnx = OnnxModel(hf_export[1])
    ids, _ = _inputs(VOCAB, batch=2, seq=6, seed=9)
    mask = torch.ones_like(ids)
    if name not in DECODERS:
        with pytest.raises(RuntimeInputError, match="does not generate"):
            onnx.generate(ids.numpy(), mask.numpy(), NEW_TOKENS)
        return
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :]
    got = onnx.generate(ids.numpy(), mask.numpy(), NEW_TOKENS)
    assert want.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(got, want.numpy())


def test_adapter_for_another_architecture_names_the_first_module(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    torch.manual_seed(0)
    llama = MODELS["llama"][0]()
    gpt2 = MODELS["gpt2"][0]()
    gpt2.save_pretrained(root / "gpt2")
    p = peft.get_peft_model(llama, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    p.save_pretrained(root / "llama-adapter")
    r = run(
        "merge-and-export",
        "--base",
        root / "gpt2",
        "--adapter",
        root / "llama-adapter",
        "--out",
        root / "out",
        "--no-verify",
    )
    refused(r, 3, "'model.layers.0.self_attn.q_proj'")
    assert not (root / "out").exists()


def test_classifier_head_modules_to_save_and_trained_biases(tmp_path):
    """modules_to_save (the head) and bias='lora_only' come from the adapter, as PEFT merges them."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    p = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=2, target_modules=["query", "value"], modules_to_save=["classifier"], bias="lora_only"
        ),
    )
    _randomize_b(p, 2)
    with torch.no_grad():
        for name, prm in p.named_parameters():
            if prm.requires_grad and "lora_" not in name:  # the head and the trained biases
                prm.add_(torch.randn(prm.shape) * 0.1)
    p.save_pretrained(tmp_path / "adapter")
    _, ours_base = load_base(tmp_path / "base")
    ours, _ = merged_model(ours_base, [Adapter.load(tmp_path / "adapter")])
    theirs = copy.deepcopy(p).merge_and_unload().eval().state_dict()
    for key, w in ours.state_dict().items():
        assert torch.allclose(w, theirs[key], rtol=0, atol=1e-6), key
    assert not torch.equal(ours.state_dict()["classifier.weight"], base.state_dict()["classifier.weight"])
    report = merge_and_export(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", samples=2, latency=False
    )
    assert report.passed and report.export.outputs["model"] == ["logits"]


def test_train_needs_the_base_tokenizer(hf_case, tmp_path):
    """These bases have no tokenizer files: training cannot read text (tests/e2e/test_train_hf_cli.py
    trains bases that have one)."""
    _, base_dir, _, _ = hf_case
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "12 21"}\n')
    r = run("train", "--base", base_dir, "--data", data, "--out", tmp_path / "o", quiet=False)
    refused(r, 3, "has no tokenizer (tokenizer_config.json)")
    nothing_left(tmp_path / "o")


@pytest.mark.slow
def test_dynamo_exporter_on_a_decoder(tmp_path):
    """The default for HF models is TorchScript (export speed); dynamo must work as well."""
    torch.manual_seed(0)
    MODELS["llama"][0]().save_pretrained(tmp_path / "base")
    p = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    _randomize_b(p, 3)
    p.save_pretrained(tmp_path / "adapter")
    report = merge_and_export(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", exporter="dynamo", samples=2, latency=False
    )
    assert report.passed and report.export.exporter == "dynamo"
    assert report.parity[0].generation.identical_rows == report.parity[0].generation.rows > 0


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_half_stored_weights_export_verifies(name, tmp_path):
    """--dtype bfloat16 on a TorchScript export (Conv1D decoder; encoder): exact against the
    rounded merge, and the rounding's cost against the unmerged model is reported."""
    build, targets = MODELS[name]
    torch.manual_seed(0)
    build().eval().save_pretrained(tmp_path / "base")
    p = peft.get_peft_model(
        build().eval(), peft.LoraConfig(r=2, target_modules=targets, fan_in_fan_out=name == "gpt2")
    )
    _randomize_b(p, 4)  # only the adapter's tensors are saved; the base above is the one merged into
    p.save_pretrained(tmp_path / "adapter")
    report = merge_and_export(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="bfloat16", samples=2, latency=False
    )
    assert report.passed, report.failures
    assert ("bfloat16", "merged") in {(h.dtype, h.variant) for h in report.half}
    assert json.loads((tmp_path / "out" / "loraexport.json").read_text())["weights_dtype"] == "bfloat16"
