"""``--stream`` against hostile or unusual inputs (a review's findings, each kept as a test): the
streamed export and its layer-streamed reference read a checkpoint as transformers does, or the
input is refused in one line (exit 3) before anything is written; nothing is left beside it."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import onnx
import peft
import pytest
import torch
from artifacts import make_hf_decoder, make_peft_adapter
from clihelp import ok, refused, run, untouched
from safetensors.torch import load_file, save_file
from tamper import restamp

pytestmark = pytest.mark.slow  # exports and onnxruntime sessions: seconds each


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = make_hf_decoder(root / "base", "llama")
    make_peft_adapter(copy.deepcopy(model), root / "adapter", "llama")
    return root / "base", root / "adapter", model


def _variant(base, dst, config=None, tensors=None):
    """A copy of ``base`` with config.json updated by ``config`` and its tensors edited in place."""
    shutil.copytree(base, dst)
    if config:
        c = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**c, **config}))
    if tensors:
        t = load_file(str(dst / "model.safetensors"))
        tensors(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _peft(model, directory, **config):
    """A PEFT adapter whose every trainable tensor (LoRA B, biases, saved modules) is moved."""
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, **config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_pretrained(directory)


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("qwen2", dict(target_modules=["q_proj", "v_proj"], bias="lora_only")),
        ("llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ],
    ids=["trained-biases", "modules-to-save"],
)
def test_an_adapters_replaced_tensors_reach_the_export_and_the_reference(tmp_path, kind, config):
    model = make_hf_decoder(tmp_path / "base", kind)
    _peft(model, tmp_path / "adapter", **config)
    ok(
        run(
            "merge-and-export",
            "--base",
            tmp_path / "base",
            "--adapter",
            tmp_path / "adapter",
            "--out",
            tmp_path / "o",
            "--stream",
        )
    )


def test_a_checkpoints_own_lm_head_is_kept_when_the_config_ties_it(llama, tmp_path):
    base, adapter, _ = llama
    v = _variant(base, tmp_path / "v", {"tie_word_embeddings": True})  # lm_head.weight stays, differs
    ok(run("merge-and-export", "--base", v, "--adapter", adapter, "--out", tmp_path / "o", "--stream"))


def test_bias_tensors_the_config_has_no_bias_for_are_refused_not_dropped(llama, tmp_path):
    """Strict loading (issue 23): transformers drops them (attention_bias is false), which computes
    another model than the checkpoint's; both paths refuse them by name instead."""
    base, adapter, _ = llama

    def add_biases(t):
        for i in range(2):
            for n in ("q_proj", "k_proj", "v_proj"):
                w = t[f"model.layers.{i}.self_attn.{n}.weight"]
                t[f"model.layers.{i}.self_attn.{n}.bias"] = torch.full((w.shape[0],), 0.5)

    v = _variant(base, tmp_path / "v", tensors=add_biases)  # attention_bias stays false
    needle = "unexpected tensor 'model.layers.0.self_attn.k_proj.bias' (6 unexpected)"
    for stream in ("--stream", "--no-stream"):
        refused(run("export", "--model", v, "--out", tmp_path / "a", stream), 3, needle)
        refused(
            run("merge-and-export", "--base", v, "--adapter", adapter, "--out", tmp_path / "c", stream),
            3,
            needle,
        )


@pytest.mark.parametrize(
    ("config", "edit", "needles"),
    [
        (
            {"attention_bias": True},
            lambda t: t.update(
                {
                    f"model.layers.{i}.self_attn.{n}.bias": torch.zeros(
                        33 if n == "o_proj" else 16 if n != "q_proj" else 32
                    )
                    for i in range(2)
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                }
            ),
            ("o_proj.bias has shape [33]", "config.json gives [32]"),
        ),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            None,
            ("--stream", "rope_type is 'linear'"),
        ),
        ({"max_position_embeddings": 6}, None, ("max_position_embeddings 6",)),
    ],
    ids=["o-proj-bias-shape", "linear-rope", "too-few-positions"],
)
def test_a_checkpoint_the_streamed_path_cannot_compute_is_refused_in_one_line(
    llama, tmp_path, config, edit, needles
):
    base, adapter, _ = llama
    v = _variant(base, tmp_path / "v", config, edit)
    with untouched(tmp_path):
        refused(
            run("merge-and-export", "--base", v, "--adapter", adapter, "--out", tmp_path / "o", "--stream"),
            3,
            *needles,
        )


def test_a_config_without_rms_norm_eps_takes_transformers_default(llama, tmp_path):
    base, adapter, _ = llama
    v = _variant(base, tmp_path / "v")
    c = json.loads((v / "config.json").read_text())
    c.pop("rms_norm_eps")
    (v / "config.json").write_text(json.dumps(c))
    ok(run("merge-and-export", "--base", v, "--adapter", adapter, "--out", tmp_path / "o", "--stream"))


def test_float16_storage_refuses_an_embedding_beyond_its_range(llama, tmp_path):
    base, _, _ = llama
    v = _variant(
        base, tmp_path / "v", tensors=lambda t: t["model.embed_tokens.weight"].__setitem__((7, 3), 1e5)
    )
    with untouched(tmp_path):
        refused(
            run("export", "--model", v, "--out", tmp_path / "o", "--stream", "--dtype", "float16"),
            3,
            "embed_tokens",
            "float16",
        )


def test_a_tensor_in_two_shards_is_refused(llama, tmp_path):
    """By the streamed export and by ``merge`` (which merged the module twice and wrote both)."""
    _, adapter, model = llama
    v = tmp_path / "v"
    copy.deepcopy(model).save_pretrained(v, max_shard_size="20KB")
    index = json.loads((v / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    t = load_file(str(v / other))
    t[name] = torch.zeros_like(model.model.layers[0].self_attn.q_proj.weight)
    save_file(t, str(v / other), metadata={"format": "pt"})
    with untouched(tmp_path):
        refused(run("export", "--model", v, "--out", tmp_path / "o", "--stream"), 3, "is in two shards")
        refused(
            run("merge", "--base", v, "--adapter", adapter, "--out", tmp_path / "m"), 3, name, "is also in"
        )


@pytest.mark.parametrize(
    "config, needle",
    [
        ({"model_type": "llama", "hidden_size": "x"}, "hidden_size must be an integer"),
        ({"model_type": "llama", "rope_parameters": {"rope_theta": -5.0}}, "rope_parameters.rope_theta"),
        ([1, 2], "expected a JSON object"),
    ],
    ids=["hidden-size", "rope-theta", "not-an-object"],
)
def test_merge_refuses_a_config_a_loader_would(llama, tmp_path, config, needle):
    """merge copies config.json into its output: one a loader refuses was copied, exit 0, and the
    merged checkpoint could not be loaded."""
    base, adapter, _ = llama
    v = tmp_path / "v"
    shutil.copytree(base, v)
    (v / "config.json").write_text(json.dumps(config))
    with untouched(tmp_path):
        refused(
            run("merge", "--base", v, "--adapter", adapter, "--out", tmp_path / "m"), 3, "config.json", needle
        )


def test_two_adapters_replacing_one_tensor_differently_are_refused(tmp_path):
    model = make_hf_decoder(tmp_path / "base", "qwen2")
    _peft(model, tmp_path / "a1", target_modules=["q_proj", "v_proj"], bias="lora_only")
    torch.manual_seed(5)
    _peft(model, tmp_path / "a2", target_modules=["q_proj", "v_proj"], bias="lora_only")
    t = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith(".bias"))
    t[key] = t[key] + 1.0
    save_file(t, str(tmp_path / "a2" / "adapter_model.safetensors"))
    args = ("--adapter", tmp_path / "a1", "--adapter", tmp_path / "a2", "--out", tmp_path / "o", "--stream")
    refused(run("export", "--model", tmp_path / "base", *args), 3, "two adapters replace")


FALSE_FACTS = (4, "'model' is not what the checkpoint's config says")  # the proof's claims (was exit 3)


@pytest.mark.parametrize(
    ("edit", "code", "needles"),
    [
        (lambda meta, out: meta["model"].update(n_layers=1), *FALSE_FACTS),
        (lambda meta, out: meta["model"].update(head_dim=3), *FALSE_FACTS),
        (lambda meta, out: (out / "model.onnx.data").unlink(), 3, "model.onnx.data"),
        (lambda meta, out: (out / "model.onnx").write_bytes(b"garbage"), 3, "not a readable ONNX model"),
    ],
    ids=["n-layers", "head-dim", "no-data", "garbage-graph"],
)
def test_verify_stream_refuses_a_tampered_export_in_one_line(llama, tmp_path, edit, code, needles):
    base, adapter, _ = llama
    out = tmp_path / "out"
    ok(run("export", "--model", base, "--adapter", adapter, "--out", out, "--stream"))
    meta = json.loads((out / "loraexport.json").read_text())
    edit(meta, out)
    (out / "loraexport.json").write_text(json.dumps(meta))
    restamp(out)  # loraexport.json made to agree with the files (else: exit 4, files changed)
    r = run("verify", "--base", base, "--adapter", adapter, "--onnx", out, "--stream")
    line = refused(r, code, needles, printed=code == 4)
    assert ".loraexport-chunks" not in line  # the export's own file is named, not a scratch copy
    assert not list(tmp_path.glob(".loraexport-*"))


def test_a_failure_while_the_chunks_are_written_leaves_no_scratch_folder(llama, tmp_path, monkeypatch):
    from loraexport.verify import chunked

    base, adapter, _ = llama
    out = tmp_path / "out"
    ok(run("export", "--model", base, "--adapter", adapter, "--out", out, "--stream"))
    meta = json.loads((out / "loraexport.json").read_text())

    def full_disk(*a, **k):
        raise KeyboardInterrupt  # what a signal raises mid-way

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(KeyboardInterrupt):
        chunked.ChunkedDecoder(out, meta)
    assert not list(tmp_path.glob(".loraexport-*"))


def test_streamed_options_that_cannot_apply_are_refused(llama, tmp_path):
    base, adapter, _ = llama
    with untouched(tmp_path):
        r = run(
            "merge-and-export",
            "--base",
            base,
            "--adapter",
            adapter,
            "--out",
            tmp_path / "o",
            "--stream",
            "--provider",
            "cuda",
        )
        refused(r, 3, "runs on the CPU", "cuda")
    ok(
        run(
            "export",
            "--model",
            base,
            "--adapter",
            adapter,
            "--out",
            tmp_path / "bf",
            "--stream",
            "--dtype",
            "bfloat16",
        )
    )
    r = run("verify", "--base", base, "--adapter", adapter, "--onnx", tmp_path / "bf")
    refused(r, 3, "not verified yet", "--no-stream")


def test_an_export_inside_the_base_gets_its_scratch_folder_outside(llama, tmp_path, monkeypatch):
    """Verification writes nothing inside an input, not even for a while: an export that sits in
    the base's folder gets its chunks in the system's temporary folder."""
    import tempfile

    base, adapter, _ = llama
    v = _variant(base, tmp_path / "v")
    ok(run("export", "--model", v, "--adapter", adapter, "--out", tmp_path / "out", "--stream"))
    shutil.move(tmp_path / "out", v / "onnx")  # the user keeps the export in the base's folder
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(k.get("dir")) or real(*a, **k))
    ok(run("verify", "--base", v, "--adapter", adapter, "--onnx", v / "onnx", "--stream", "--no-latency"))
    temp = Path(tempfile.gettempdir()).resolve()
    assert made and all(d is None or Path(d).resolve() == temp for d in made), made
    assert not list(v.glob(".loraexport-*"))


@pytest.mark.parametrize("how", [("--stream",), ("--optimize", "--no-stream")])
def test_rotary_tables_a_config_asks_for_beyond_the_model_are_refused(tmp_path, how):
    """head_dim 256 and 2^20 positions, each within its range, asked a 36 KB checkpoint for 1 GB of
    cos/sin tables (written, exit 0): refused before they are made, from the checkpoint or in memory."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=2**20,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "v")
    with untouched(tmp_path):
        r = run("export", "--model", tmp_path / "v", "--out", tmp_path / "o", *how)
        refused(r, 3, "max_position_embeddings 1048576", "1,024 MiB of cos/sin tables")
