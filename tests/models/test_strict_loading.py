"""Strict loading (models/strict.py): every tensor a model needs comes from its checkpoint, and
every tensor in the checkpoint is used or ignored by a named rule, for transformers bases (from the
headers, then transformers' own report), the streamed export's checkpoint, the reference model,
and adapters.

The two defects of issue 23: a base saved from a PEFT-wrapped model (``q_proj.base_layer.weight``
and ``q_proj.lora_A.default.weight`` in place of ``q_proj.weight``), which transformers loaded with
random q and v projections, and a base missing one projection while holding an extra tensor of
the same size, which a parameter count cannot tell from a whole one. And the checkpoints that must
keep loading: tied heads, GPT-2's stored mask buffers, BERT with or without its prefix, with a
masked-LM head beside it, with legacy LayerNorm names, a classifier whose head is new.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from artifacts import HF_DECODER, HF_TARGETS, make_base, make_hf_decoder
from clihelp import one_line_message
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraexport.errors import AdapterFormatError, ModelFormatError  # noqa: E402
from loraexport.export.streamed import CheckpointSource  # noqa: E402
from loraexport.lora.adapter import WEIGHTS_NAME, Adapter  # noqa: E402
from loraexport.models import strict  # noqa: E402
from loraexport.models.reference import WEIGHTS, load_model  # noqa: E402
from loraexport.models.registry import load_base, load_model_dir  # noqa: E402
from loraexport.stages.inputs import load_inputs  # noqa: E402

DECODERS = ("llama", "qwen2", "gpt2")
STREAMED = ("llama", "qwen2")  # the families a streamed export writes
# The projection each defect takes away, and the tensor of the same size put in its place
DROPPED = {
    "llama": "model.layers.1.self_attn.v_proj.weight",
    "qwen2": "model.layers.1.self_attn.v_proj.weight",
    "gpt2": "transformer.h.1.attn.c_proj.weight",
    "bert": "encoder.layer.0.attention.self.value.weight",
}
EXTRA = {kind: name.replace(".weight", ".weight_orig") for kind, name in DROPPED.items()}
# The first tensor PEFT's wrapper renames (natural order: a bias before its weight), as the error names it
WRAPPED = {
    "llama": "model.layers.0.self_attn.q_proj.weight",
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "gpt2": "transformer.h.0.attn.c_attn.bias",
    "bert": "encoder.layer.0.attention.self.query.bias",
}
BERT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
BERT_TARGETS = ["query", "value"]


# ---- bases and their defects --------------------------------------------------------------------
def _bert(directory: Path, cls=None, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = (cls or transformers.BertModel)(transformers.BertConfig(**BERT, **config)).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """(directory, model) of a tiny correct base per family."""
    root = tmp_path_factory.mktemp("bases")
    out = {kind: (root / kind, make_hf_decoder(root / kind, kind)) for kind in DECODERS}
    out["bert"] = (root / "bert", _bert(root / "bert"))
    return out


def _targets(kind: str) -> list[str]:
    return BERT_TARGETS if kind == "bert" else HF_TARGETS[kind]


def _wrapped(model: torch.nn.Module, kind: str, directory: Path, whole_state: bool = False) -> Path:
    """``model`` saved as people save it from inside PEFT: the wrapped model's ``save_pretrained``
    (``base_layer`` and ``lora_A.default`` names), or ``whole_state``: the PeftModel's state dict
    (also under ``base_model.model.``) written over a correct checkpoint."""
    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=2, target_modules=_targets(kind), fan_in_fan_out=kind == "gpt2"),
    )
    lora.base_model.model.save_pretrained(directory)
    if whole_state:
        state = {k: v.contiguous() for k, v in lora.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the base in ``src`` whose tensors ``edit`` changed in place; config.json the same."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _swapped(src: Path, dst: Path, kind: str) -> Path:
    """One projection gone, a tensor of its size under another name: the count is unchanged."""

    def swap(t):
        t[EXTRA[kind]] = t.pop(DROPPED[kind])

    return _edited(src, dst, swap)


def _float_values(directory: Path) -> int:
    return sum(t.numel() for t in load_file(str(directory / "model.safetensors")).values())


def _refused(directory: Path, *needles: str) -> str:
    with pytest.raises(ModelFormatError) as e:
        load_base(directory)
    return one_line_message(e, *needles)


# ---- the two defects, in memory -----------------------------------------------------------------
@pytest.mark.parametrize("kind", [*DECODERS, "bert"])
def test_a_base_saved_from_a_peft_wrapped_model_is_refused_with_the_hint(bases, kind, tmp_path):
    d = _wrapped(bases[kind][1], kind, tmp_path / "wrapped")
    msg = _refused(
        d, "the checkpoint does not match config.json", f"no tensor '{WRAPPED[kind]}'", ".base_layer."
    )
    assert strict.PEFT_HINT in msg and "unload()" in msg


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_the_whole_state_dict_of_a_peft_model_is_refused_with_the_hint(bases, kind, tmp_path):
    """Every name under ``base_model.model.``: nothing of the model is where transformers looks."""
    d = _wrapped(bases[kind][1], kind, tmp_path / "wrapped", whole_state=True)
    msg = _refused(d, "'base_model.model.", strict.PEFT_HINT)
    assert "missing" in msg


@pytest.mark.parametrize("kind", [*DECODERS, "bert"])
def test_a_base_missing_a_projection_beside_a_tensor_of_its_size_is_refused(bases, kind, tmp_path):
    d = _swapped(bases[kind][0], tmp_path / "swapped", kind)
    assert _float_values(d) == _float_values(bases[kind][0])  # a parameter count cannot tell
    msg = _refused(d, f"no tensor '{DROPPED[kind]}' (1 missing)", f"unexpected tensor '{EXTRA[kind]}'")
    assert strict.PEFT_HINT not in msg


def test_an_unused_bias_is_refused_not_dropped(bases, tmp_path):
    """Llama without attention_bias: transformers would drop a stored q_proj bias, computing
    another model than the checkpoint's (a Qwen2 checkpoint labelled llama, say)."""
    name = "model.layers.0.self_attn.q_proj.bias"
    d = _edited(bases["llama"][0], tmp_path / "b", lambda t: t.update({name: torch.full((32,), 0.5)}))
    _refused(d, f"unexpected tensor '{name}' (1 unexpected)")
    with pytest.raises(ModelFormatError, match=f"unexpected tensor '{name}'"):
        CheckpointSource(d)


def test_one_parameter_stored_under_two_names_is_refused(bases, tmp_path):
    """With and without the base model's prefix: transformers would keep one and drop the other."""
    key = "encoder.layer.0.attention.self.query.weight"
    d = _edited(bases["bert"][0], tmp_path / "b", lambda t: t.update({f"bert.{key}": t[key] + 1}))
    _refused(d, f"'{key}'", f"'bert.{key}'", f"both hold '{key}'")


# ---- the two defects, streamed ------------------------------------------------------------------
@pytest.mark.parametrize("kind", STREAMED)
def test_the_streamed_checkpoint_refuses_both_defects(bases, kind, tmp_path):
    wrapped = _wrapped(bases[kind][1], kind, tmp_path / "wrapped")
    with pytest.raises(ModelFormatError) as e:
        CheckpointSource(wrapped)
    one_line_message(e, f"no tensor '{WRAPPED[kind]}'", ".base_layer.", strict.PEFT_HINT)
    with pytest.raises(ModelFormatError) as e:
        CheckpointSource(_swapped(bases[kind][0], tmp_path / "swapped", kind))
    one_line_message(e, f"no tensor '{DROPPED[kind]}' (1 missing)", f"unexpected tensor '{EXTRA[kind]}'")


def test_the_streamed_checkpoint_ignores_stored_rotary_buffers(bases, tmp_path):
    """Checkpoints saved before transformers moved ``inv_freq`` to the model hold one per layer."""
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    d = _edited(bases["llama"][0], tmp_path / "rope", lambda t: t.update({name: torch.ones(4)}))
    assert CheckpointSource(d).layers == HF_DECODER["num_hidden_layers"]
    load_base(d)  # and transformers' path agrees


# ---- what keeps loading -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*DECODERS, "bert"])
def test_a_correct_base_loads_with_every_tensor_from_the_checkpoint(bases, kind):
    directory, model = bases[kind]
    _, loaded = load_base(directory)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads_load(tmp_path, tied):
    """Tied: the checkpoint holds the embedding only (lm_head is not missing); untied: both."""
    model = make_hf_decoder(tmp_path / "b", "qwen2", tie_word_embeddings=tied)
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tied
    _, loaded = load_base(tmp_path / "b")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    CheckpointSource(tmp_path / "b")


def test_a_gpt2_checkpoint_with_its_stored_mask_buffers_loads(bases, tmp_path):
    """Older GPT-2 checkpoints (the hub's ``gpt2``) store the causal mask and its fill value per
    layer, without the ``transformer.`` prefix."""

    def old_style(t):
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        for i in range(HF_DECODER["num_hidden_layers"]):
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    d = _edited(bases["gpt2"][0], tmp_path / "old", old_style)
    _, loaded = load_base(d)
    assert torch.equal(
        loaded.transformer.h[0].attn.c_attn.weight, bases["gpt2"][1].transformer.h[0].attn.c_attn.weight
    )


def test_bert_loads_with_or_without_its_prefix_with_its_masked_lm_head_and_legacy_names(bases, tmp_path):
    """bert-base-uncased's layout: ``bert.`` names, a stored ``position_ids``, the masked-LM head
    ``cls.`` beside the encoder (ignored: another task's head), ``LayerNorm.gamma/beta``."""
    directory, model = bases["bert"]

    def pretraining(t):
        for name in list(t):
            t[
                "bert."
                + name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                    "LayerNorm.bias", "LayerNorm.beta"
                )
            ] = t.pop(name)
        t["bert.embeddings.position_ids"] = torch.arange(512)[None]
        t["cls.predictions.bias"] = torch.zeros(BERT["vocab_size"])
        t["cls.predictions.transform.LayerNorm.gamma"] = torch.ones(BERT["hidden_size"])

    d = _edited(directory, tmp_path / "pretraining", pretraining)
    _, loaded = load_base(d)
    want = model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in loaded.state_dict().items())


def test_a_masked_lm_checkpoint_without_a_pooler_loads_as_a_bare_encoder(tmp_path):
    """roberta-base's layout: ``roberta.`` names, the masked-LM head ``lm_head.``, no pooler. The
    encoder is built without one (its export has no pooler output) rather than with a random one."""
    torch.manual_seed(0)
    config = transformers.RobertaConfig(**BERT, max_position_embeddings=130, pad_token_id=1)
    model = transformers.RobertaForMaskedLM(config).eval()
    model.save_pretrained(tmp_path / "mlm")
    _, loaded = load_base(tmp_path / "mlm")
    assert loaded.pooler is None
    want = model.roberta.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(want[k], v) for k, v in loaded.state_dict().items())


def test_a_classifier_missing_the_pooler_it_uses_is_refused(tmp_path):
    """Only a bare encoder, whose pooler is never exported, is built without one."""
    cls = transformers.BertForSequenceClassification
    _bert(tmp_path / "c", cls, architectures=["BertForSequenceClassification"])

    def no_pooler(t):
        for name in [n for n in t if ".pooler." in n]:
            del t[name]

    _refused(_edited(tmp_path / "c", tmp_path / "no-pooler", no_pooler), "no tensor 'bert.pooler.dense.bias'")


def test_the_rules_never_ignore_a_peft_name():
    with torch.device("meta"):
        model = transformers.BertModel(transformers.BertConfig(**BERT))
    assert strict.ignorable("cls.predictions.bias", model)
    assert strict.ignorable("embeddings.position_ids", model)
    assert not strict.ignorable("classifier.modules_to_save.default.weight", model)
    assert not strict.ignorable("classifier.original_module.weight", model)
    assert not strict.ignorable("pooler.dense.weight_orig", model)  # a stray tensor of the model's own module


# ---- a classifier whose head is new ---------------------------------------------------------------
@pytest.fixture
def new_head_base(bases, tmp_path) -> Path:
    """The encoder's checkpoint under a config that declares a classifier (num_labels 2): the head
    is not in the checkpoint. ``train`` trains it; an adapter's modules_to_save then holds it."""
    d = tmp_path / "new-head"
    d.mkdir()
    (d / "model.safetensors").write_bytes((bases["bert"][0] / "model.safetensors").read_bytes())
    config = json.loads((bases["bert"][0] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    return d


def test_a_new_head_is_missing_unless_the_caller_supplies_it(new_head_base, tmp_path):
    _refused(new_head_base, "no tensor 'classifier.bias' (2 missing)")
    model = load_model_dir(new_head_base, supplied=("classifier",)).model  # as train loads it
    assert model.classifier.weight.shape == (2, BERT["hidden_size"])

    head = transformers.BertForSequenceClassification.from_pretrained(str(new_head_base)).eval()
    lora = peft.get_peft_model(
        head, peft.LoraConfig(r=2, target_modules=BERT_TARGETS, modules_to_save=["classifier"])
    )
    lora.save_pretrained(tmp_path / "adapter")
    loaded = load_inputs(new_head_base, [tmp_path / "adapter"])  # the adapter supplies the head
    assert set(loaded.adapters[0].replacements) == {"classifier.weight", "classifier.bias"}


# ---- transformers' report and the reference model -------------------------------------------------
def test_transformers_report_is_checked_after_the_headers():
    names = strict.Names({}, frozenset({"h.0.attn.masked_bias"}))
    strict.check_loaded({"missing_keys": set(), "unexpected_keys": {"h.0.attn.masked_bias"}}, "d", names)
    strict.check_loaded(
        {"missing_keys": {"classifier.weight"}, "unexpected_keys": set()}, "d", names, ("classifier",)
    )
    with pytest.raises(ModelFormatError, match="d: no tensor 'lm_head.weight' \\(1 missing\\)"):
        strict.check_loaded({"missing_keys": {"lm_head.weight"}, "unexpected_keys": set()}, "d", names)


def test_the_reference_model_refuses_peft_names_with_the_hint(tmp_path):
    d = make_base(tmp_path / "ref")
    tensors = load_file(str(d / WEIGHTS))
    w = tensors.pop("encoder.0.self_attn.q.weight")
    tensors["encoder.0.self_attn.q.base_layer.weight"] = w
    tensors["encoder.0.self_attn.q.lora_A.default.weight"] = torch.zeros(2, w.shape[1])
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as e:
        load_model(d)
    one_line_message(
        e, "no tensor 'encoder.0.self_attn.q.weight' (1 missing)", ".base_layer.weight'", strict.PEFT_HINT
    )


# ---- adapters ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(bases, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapter")
    lora = peft.get_peft_model(
        copy.deepcopy(bases["llama"][1]), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    lora.save_pretrained(d)
    return d


def _adapter_variant(adapter: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(adapter / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(dst / WEIGHTS_NAME), metadata={"format": "pt"})
    return dst


def test_an_adapter_holding_one_factor_under_two_names_is_refused(adapter, tmp_path):
    """PEFT's name with and without ``.default``: one of the two would be dropped."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    d = _adapter_variant(
        adapter, tmp_path / "a", lambda t: t.update({key.replace(".weight", ".default.weight"): t[key] * 2})
    )
    with pytest.raises(AdapterFormatError) as e:
        Adapter.load(d)
    one_line_message(e, f"'{key}'", "both give lora_A of 'model.layers.0.self_attn.q_proj'")


def test_a_wrapped_checkpoint_holds_more_values_than_the_model_needs(bases, tmp_path):
    """Why the old parameter-count check passed it: the LoRA tensors make up the count."""
    directory, model = bases["llama"]
    d = _wrapped(model, "llama", tmp_path / "w")
    assert _float_values(d) > _float_values(directory) == sum(p.numel() for p in model.parameters())
