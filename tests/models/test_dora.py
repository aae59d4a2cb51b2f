"""DoRA against PEFT as the oracle, on tiny GPT-2 (Conv1D, fan_in_fan_out), Llama and BERT.

Our float64 merge equals PEFT's ``merge_and_unload()``; the exported ONNX equals PEFT's unmerged
DoRA model; 16 greedy tokens through onnxruntime equal PEFT's ``generate``; the streaming merge
(``loraexport merge``) is bit-identical to the in-memory one; the layer-streamed path
(``--stream``) passes its own verification and generates PEFT's tokens.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from clihelp import ok, run
from safetensors.torch import load_file

from loraexport.lora.adapter import Adapter
from loraexport.lora.views import unmerged_view
from loraexport.models.registry import load_base
from loraexport.pipeline import merge_and_export
from loraexport.runtime.model import OnnxModel, RuntimeInputError, positions
from loraexport.stages.merge import merged_model
from models.test_hf import DECODERS, MODELS, VOCAB, _inputs

peft = pytest.importorskip("peft")

# Merged weights vs PEFT: both form W0 + s·B·A and scale each row by m/‖row‖; ours in float64 then
# rounded once, PEFT's in float32 (a few roundings, ~1e-7 relative measured); 1e-6 is the contract.
MERGE_REL_TOL = 1e-6
# ONNX (float32, merged) vs PEFT's unmerged float32 DoRA forward, logits O(0.1-1): a few roundings.
LOGITS_ATOL = 1e-4
# Our unmerged DoRA layer vs PEFT's: the same float32 operations in a different order.
UNMERGED_ATOL = 1e-5
NEW_TOKENS = 16
B_STD = 0.3
M_STD = 0.2  # the magnitude moved by ~20% per row: far from its start ‖W0‖, so a merge that drops it fails
FAMILIES = ("gpt2", "llama", "bert")


def _dora_model(name: str, base: torch.nn.Module, seed: int = 1):
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=MODELS[name][1], fan_in_fan_out=name == "gpt2", use_dora=True
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + M_STD * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def dora_case(request, tmp_path_factory):
    """(name, base dir, adapter dir, PEFT's unmerged DoRA model)."""
    name = request.param
    torch.manual_seed(0)
    base = MODELS[name][0]().eval()
    root = tmp_path_factory.mktemp(f"dora-{name}")
    base.save_pretrained(root / "base")
    model = _dora_model(name, base)
    model.save_pretrained(root / "adapter")
    return name, root / "base", root / "adapter", model


@pytest.fixture(scope="module")
def dora_export(dora_case, tmp_path_factory):
    _, base_dir, adapter_dir, _ = dora_case
    out = tmp_path_factory.mktemp("dora-export") / "out"
    return merge_and_export(base_dir, adapter_dir, out, samples=3, latency=False, stream=False), out


def _kw(name: str, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    kw = {"input_ids": ids, "attention_mask": mask}
    if name in DECODERS:
        kw["position_ids"] = torch.from_numpy(positions(mask.numpy()))
    return kw


def _out(name: str, out) -> torch.Tensor:
    return out.logits if name in DECODERS else out.last_hidden_state


@pytest.mark.slow
def test_adapter_holds_the_magnitude_and_loads(dora_case):
    name, _, adapter_dir, model = dora_case
    adapter = Adapter.load(adapter_dir)
    assert adapter.config.use_dora
    assert set(adapter.magnitudes) == set(adapter.weights) and adapter.magnitudes
    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    assert all(f"base_model.model.{p}.lora_magnitude_vector" in keys for p in adapter.magnitudes)


@pytest.mark.slow
def test_merged_weights_equal_peft_merge_and_unload(dora_case):
    name, base_dir, adapter_dir, model = dora_case
    _, base = load_base(base_dir)
    adapter = Adapter.load(adapter_dir)
    ours, stats = merged_model(base, [adapter])
    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    for key, w in ours.state_dict().items():
        ref = theirs[key].double()
        err = float((w.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        assert err <= MERGE_REL_TOL, (key, err)
    # the magnitude mattered: the same A, B merged as plain LoRA are far from PEFT's weights
    plain = copy.deepcopy(adapter)
    plain.config.use_dora, plain.magnitudes = False, {}
    lora_only = merged_model(base, [plain])[0].state_dict()
    key = f"{next(iter(adapter.weights))}.weight"
    assert float((lora_only[key] - theirs[key]).abs().max()) > 100 * MERGE_REL_TOL * float(
        theirs[key].abs().max()
    )
    assert stats.modules_merged == len(adapter.weights)


@pytest.mark.slow
def test_our_unmerged_dora_model_equals_peft(dora_case):
    name, base_dir, adapter_dir, model = dora_case
    _, base = load_base(base_dir)
    adapter = Adapter.load(adapter_dir)
    adapter.check_fits(base)
    ids, mask = _inputs(VOCAB)
    with torch.no_grad():
        want = _out(name, model(**_kw(name, ids, mask)))
        got = _out(name, unmerged_view(base, [adapter])(**_kw(name, ids, mask)))
        plain = _out(name, base(**_kw(name, ids, mask)))
    valid = mask.bool()
    assert float((got - want)[valid].abs().max()) <= UNMERGED_ATOL
    assert float((plain - want)[valid].abs().max()) > 100 * UNMERGED_ATOL  # the adapter did something


@pytest.mark.slow
def test_onnx_equals_peft_unmerged_dora(dora_case, dora_export):
    name, _, _, model = dora_case
    report, out_dir = dora_export
    assert report.passed, report.failures
    ids, mask = _inputs(VOCAB)
    with torch.no_grad():
        want = _out(name, model(**_kw(name, ids, mask))).numpy()
    got = OnnxModel(out_dir).forward(ids.numpy(), mask.numpy())
    valid = mask.numpy().astype(bool)
    assert np.abs(got[valid] - want[valid]).max() <= LOGITS_ATOL
    if name in DECODERS:
        assert (got[valid].argmax(-1) == want[valid].argmax(-1)).all()


def _peft_tokens(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()


@pytest.mark.slow
def test_sixteen_greedy_tokens_equal_peft_generate(dora_case, dora_export):
    name, _, _, model = dora_case
    ids, _ = _inputs(VOCAB, batch=2, seq=6, seed=9)
    if name not in DECODERS:  # an encoder export says so instead of generating
        with pytest.raises(RuntimeInputError, match="does not generate"):
            OnnxModel(dora_export[1]).generate(ids.numpy(), np.ones_like(ids.numpy()), NEW_TOKENS)
        return
    got = OnnxModel(dora_export[1]).generate(ids.numpy(), np.ones_like(ids.numpy()), NEW_TOKENS)
    want = _peft_tokens(model, ids)
    assert want.shape == (2, NEW_TOKENS)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_streaming_merge_is_bit_identical_to_in_memory(dora_case, tmp_path):
    name, base_dir, adapter_dir, _ = dora_case
    ok(run("merge", "--base", base_dir, "--adapter", adapter_dir, "--out", tmp_path / "m"))
    streamed = load_file(tmp_path / "m" / "model.safetensors")
    _, base = load_base(base_dir)
    adapter = Adapter.load(adapter_dir)
    adapter.check_fits(base)
    in_memory = merged_model(base, [adapter])[0].state_dict()
    for key in adapter.weights:
        assert torch.equal(streamed[f"{key}.weight"], in_memory[f"{key}.weight"]), key


@pytest.mark.slow
def test_layer_streamed_export_of_dora_llama_verifies_and_generates_peft_tokens(tmp_path):
    torch.manual_seed(0)
    base = MODELS["llama"][0]().eval()
    base.save_pretrained(tmp_path / "base")
    model = _dora_model("llama", base, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    args = ["--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--out", out, "--stream"]
    ok(run("merge-and-export", *args, "--no-latency"))
    ids, _ = _inputs(VOCAB, batch=2, seq=6, seed=9)
    got = OnnxModel(out).generate(ids.numpy(), np.ones_like(ids.numpy()), NEW_TOKENS)
    np.testing.assert_array_equal(got, _peft_tokens(model, ids))
