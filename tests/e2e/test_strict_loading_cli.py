"""Strict loading through the real CLI (issue 23, part 5): a base saved from a PEFT-wrapped model,
and a base missing one projection beside a tensor of the same size, each exit 3 in one line
naming the tensor (with a hint where the names are PEFT's), through ``merge-and-export`` in memory
and with ``--stream`` and through ``export``; an adapter holding a tensor no module takes, exit 3
naming it. Nothing is written and the inputs are left as they were. Correct bases still export,
and a classifier whose head is new still trains and exports.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from artifacts import TRAIN_WORDS, make_hf_decoder, make_peft_adapter, word_tokenizer
from clihelp import nothing_left, ok, refused, run, untouched
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from loraexport.lora.adapter import WEIGHTS_NAME, Adapter  # noqa: E402
from loraexport.models.strict import PEFT_HINT  # noqa: E402

KINDS = ("llama", "qwen2", "gpt2")
STREAMED = ("llama", "qwen2")  # what --stream writes
# command -> the flags it adds; in memory is --no-stream (the default, auto, is memory for these sizes)
COMMANDS = {
    "merge-and-export": ("--no-stream",),
    "merge-and-export --stream": ("--stream",),
    "export": ("--no-stream",),
    "export --stream": ("--stream",),
}
CASES = [(k, c) for k in KINDS for c in COMMANDS if k in STREAMED or "--stream" not in c]


def _args(command: str, base: Path, adapter: Path, out: Path) -> tuple:
    """``export`` exports the base alone; ``merge-and-export`` with ``adapter``."""
    inputs = ("--model", base) if command.startswith("export") else ("--base", base, "--adapter", adapter)
    return (command.split()[0], *inputs, "--out", out, *COMMANDS[command])


# The first tensor PEFT's wrapper renames (a bias before its weight) and the one taken away
WRAPPED = {
    "llama": "model.layers.0.self_attn.q_proj.weight",
    "qwen2": "model.layers.0.self_attn.q_proj.bias",
    "gpt2": "transformer.h.0.attn.c_attn.bias",
}
DROPPED = {
    "llama": "model.layers.1.mlp.up_proj.weight",
    "qwen2": "model.layers.1.mlp.up_proj.weight",
    "gpt2": "transformer.h.1.mlp.c_fc.weight",
}
EXTRA = "extra.weight"  # the tensor of the same size in its place


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: a correct base, its adapter (saved by PEFT), the base saved from inside PEFT
    and the base with one projection swapped for a tensor of the same size."""
    root = tmp_path_factory.mktemp("strict")
    out = {}
    for kind in KINDS:
        d = root / kind
        model = make_hf_decoder(d / "base", kind)
        lora = make_peft_adapter(copy.deepcopy(model), d / "adapter", kind)
        lora.base_model.model.save_pretrained(d / "wrapped")  # base_layer, lora_A.default, ...
        model.save_pretrained(d / "swapped")
        tensors = load_file(str(d / "swapped" / "model.safetensors"))
        tensors[EXTRA] = tensors.pop(DROPPED[kind])
        save_file(tensors, str(d / "swapped" / "model.safetensors"), metadata={"format": "pt"})
        out[kind] = {
            "base": d / "base",
            "adapter": d / "adapter",
            "wrapped": d / "wrapped",
            "swapped": d / "swapped",
        }
    return out


def _refused_untouched(root: Path, args: tuple, *needles: str) -> str:
    """Exit 3 in one line naming every needle; nothing written, nothing under ``root`` changed."""
    out = Path(args[args.index("--out") + 1])
    with untouched(root):
        line = refused(run(*args), 3, *needles)
    nothing_left(out)
    return line


# ---- bases --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "command"), CASES)
def test_a_base_saved_from_a_peft_wrapped_model_exits_3_with_the_hint(inputs, kind, command, tmp_path):
    i = inputs[kind]
    args = _args(command, i["wrapped"], i["adapter"], tmp_path / "out")
    line = _refused_untouched(
        i["wrapped"].parent, args, f"no tensor '{WRAPPED[kind]}'", ".base_layer.", PEFT_HINT
    )
    assert str(i["wrapped"]) in line


@pytest.mark.parametrize(("kind", "command"), CASES)
def test_a_base_missing_a_projection_beside_a_tensor_of_its_size_exits_3(inputs, kind, command, tmp_path):
    i = inputs[kind]
    args = _args(command, i["swapped"], i["adapter"], tmp_path / "out")
    line = _refused_untouched(
        i["swapped"].parent, args, f"no tensor '{DROPPED[kind]}' (1 missing)", f"unexpected tensor '{EXTRA}'"
    )
    assert PEFT_HINT not in line


@pytest.mark.parametrize(
    ("kind", "command"),
    [("llama", "merge-and-export"), ("llama", "merge-and-export --stream"), ("gpt2", "merge-and-export")],
)
def test_a_correct_base_still_exports(inputs, kind, command, tmp_path):
    i = inputs[kind]
    ok(run(*_args(command, i["base"], i["adapter"], tmp_path / "out"), "--no-verify"))
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_a_masked_lm_checkpoint_exports_as_its_encoder(tmp_path):
    """roberta-base's layout (a masked-LM head beside the encoder, no pooler) exports as the
    encoder: the head is another task's, ignored by name; no random pooler is made."""
    torch.manual_seed(0)
    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    config = transformers.RobertaConfig(
        **small, intermediate_size=64, max_position_embeddings=130, pad_token_id=1
    )
    transformers.RobertaForMaskedLM(config).save_pretrained(tmp_path / "base")
    ok(run("export", "--model", tmp_path / "base", "--out", tmp_path / "out"))


# ---- adapters -----------------------------------------------------------------------------------
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _copy_module(t: dict, to: str, rows: int | None = None) -> None:
    """The LoRA factors of layer 0's q_proj again, for module ``to`` (lora_B cut to ``rows``)."""
    for which in "AB":
        v = t[f"{Q}.lora_{which}.weight"]
        t[f"{Q}.lora_{which}.weight".replace("q_proj", to)] = v[: rows if which == "B" else None].clone()


# edit of the adapter's tensors -> what the error names
ADAPTER_EDITS = {
    # a tensor of no LoRA layer
    "stray-name": (
        lambda t: t.update({f"{Q}.lora_C.weight": t[f"{Q}.lora_A.weight"].clone()}),
        f"unexpected tensor '{Q}.lora_C.weight'",
    ),
    # a module the base does not have
    "no-such-module": (lambda t: _copy_module(t, "z_proj"), "'model.layers.0.self_attn.z_proj'"),
    # a module of the base the config does not target (k_proj: 2 kv heads of 8)
    "untargeted-module": (lambda t: _copy_module(t, "k_proj", 16), "'model.layers.0.self_attn.k_proj'"),
    # lora_B without its lora_A
    "b-without-a": (lambda t: t.pop(f"{Q}.lora_A.weight"), f"'{Q}.lora_A.weight'"),
    # one factor under PEFT's two names: one would be dropped
    "two-names": (
        lambda t: t.update({f"{Q}.lora_A.default.weight": t[f"{Q}.lora_A.weight"].clone()}),
        f"'{Q}.lora_A.default.weight'",
    ),
}


@pytest.mark.parametrize("command", ["merge-and-export", "merge-and-export --stream"])
@pytest.mark.parametrize("edit", list(ADAPTER_EDITS))
def test_an_adapter_tensor_no_module_takes_exits_3_naming_it(inputs, edit, command, tmp_path):
    i = inputs["llama"]
    change, needle = ADAPTER_EDITS[edit]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((i["adapter"] / "adapter_config.json").read_bytes())
    tensors = load_file(str(i["adapter"] / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    _refused_untouched(tmp_path, _args(command, i["base"], adapter, tmp_path / "out"), needle)


# ---- a classifier whose head is new -------------------------------------------------------------
def test_a_classifier_with_a_new_head_trains_and_exports(tmp_path):
    """An encoder's checkpoint under a config that declares a classifier: ``train`` trains the
    new head (not a missing tensor there), and merge-and-export takes it from the adapter's
    modules_to_save; without the adapter the head is missing."""
    torch.manual_seed(0)
    small = dict(vocab_size=4 + TRAIN_WORDS, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    transformers.BertModel(transformers.BertConfig(**small, intermediate_size=64)).save_pretrained(
        tmp_path / "base"
    )
    word_tokenizer("bert").save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config |= {"architectures": ["BertForSequenceClassification"], "num_labels": 2}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    lines = [
        {"text": f"w{(a := rng.randrange(20))} w{rng.randrange(20, 40)}", "label": int(a < 10)}
        for _ in range(32)
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    ok(run("train", "--base", base, "--data", tmp_path / "data.jsonl", "--out", adapter,
           "--steps", "4", "--rank", "2", "--batch-size", "8", "--eval-fraction", "0.25"))  # fmt: skip
    assert set(Adapter.load(adapter).replacements) == {"classifier.weight", "classifier.bias"}
    ok(
        run(
            "merge-and-export", "--base", base, "--adapter", adapter, "--out", tmp_path / "out", "--no-verify"
        )
    )
    refused(
        run("export", "--model", tmp_path / "base", "--out", tmp_path / "o2"),
        3,
        "no tensor 'classifier.bias'",
    )
