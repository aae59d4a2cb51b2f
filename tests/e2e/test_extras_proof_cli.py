"""The files an app reads beside the graph (config.json, generation_config.json, the tokenizer's,
genai_config.json) are proven to be what exporting the base makes (``stages.extras``), for float32
and quantized exports: each edit here, restamped so that the sha256 check passes, passed ``verify``
before and exits 4 now, naming the file. A base whose JSON files were saved again with another
layout still verifies (compared by value)."""

from __future__ import annotations

import json
import shutil

import pytest
from artifacts import word_tokenizer
from clihelp import QUICK, ok, refused, run
from hf_tiny import save_base_and_adapter
from tamper import restamp

pytest.importorskip("peft")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base, adapter = save_base_and_adapter("llama", tmp_path_factory.mktemp("llama"))
    word_tokenizer("llama").save_pretrained(base)
    return base, adapter


@pytest.fixture(scope="module", params=["float32", "int8"])
def export(request, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    quantize = ("--quantize", "int8") if request.param == "int8" else ()
    ok(run("merge-and-export", "--base", inputs[0], "--adapter", inputs[1], "--out", out, *QUICK, *quantize))
    assert {"config.json", "tokenizer.json", "genai_config.json"} <= {p.name for p in out.iterdir()}
    return out


def _verify(inputs, onnx_dir, base=None):
    base = base or inputs[0]
    return run("verify", "--base", base, "--adapter", inputs[1], "--onnx", onnx_dir, *QUICK, "--json")


def _edited(src, tmp_path, name, change):
    out = tmp_path / "planted"
    shutil.copytree(src, out)
    data = json.loads((out / name).read_text())
    change(data)
    (out / name).write_text(json.dumps(data, indent=2))
    restamp(out)
    return out


def _swap_two_ids(tokenizer: dict) -> None:
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]


@pytest.mark.parametrize(
    "name, change",
    [
        ("config.json", lambda c: c.update(eos_token_id=5)),
        ("genai_config.json", lambda c: c["model"].update(eos_token_id=5)),
        ("genai_config.json", lambda c: c["model"]["decoder"].update(num_key_value_heads=1)),
        ("tokenizer.json", _swap_two_ids),
    ],
    ids=["config-eos", "genai-eos", "genai-kv-heads", "tokenizer-ids"],
)
def test_an_edited_side_file_fails_the_proof(inputs, export, tmp_path, name, change):
    planted = _edited(export, tmp_path, name, change)
    refused(_verify(inputs, planted), 4, name, "not the one exporting the base makes", printed=True)


def test_a_side_file_the_base_does_not_make_is_unclaimed(inputs, export, tmp_path):
    planted = tmp_path / "planted"
    shutil.copytree(export, planted)
    (planted / "special_tokens_map.json").write_text('{"eos_token": "w1"}')
    meta = json.loads((planted / "loraexport.json").read_text())
    meta["files"]["special_tokens_map.json"] = ""
    (planted / "loraexport.json").write_text(json.dumps(meta))
    restamp(planted)
    refused(_verify(inputs, planted), 4, "special_tokens_map.json", "unclaimed", printed=True)


def test_a_base_saved_again_with_another_layout_still_verifies(inputs, export, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(inputs[0], base)
    for name in ("config.json", "tokenizer.json"):
        (base / name).write_text(json.dumps(json.loads((base / name).read_text()), indent=4, sort_keys=True))
    verified = json.loads(ok(_verify(inputs, export, base)).stdout)
    assert verified["passed"] and verified["proof"]["passed"]
    extras = [f for f in verified["proof"]["files"] if f["file"] == "config and tokenizer files"]
    assert extras and extras[0]["bytes"] > 0 and extras[0]["passed"]
