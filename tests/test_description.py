"""``description.py``: ``loraexport.json`` read back bounded and checked key by key, each
refusal naming the file, the key and the value, in the reader's own error type."""

from __future__ import annotations

import copy
import json

import pytest

from loraexport.artifact.schema import EXPORTERS, KINDS, META, check_export_meta, read_export_meta
from loraexport.core.enums import ExportMode, Precision

GOOD = {
    "model": {"kind": "causal", "family": "reference", "special_tokens": {"bos": 1, "eos": 2, "pad": None}},
    "graphs": {"model": {"inputs": ["input_ids", "attention_mask"], "outputs": ["logits"]}},
    "opset": 18,
    "exporter": "dynamo",
    "weights_dtype": "bfloat16",
    "mode": "merged",
    "inputs": {},
    "versions": {"loraexport": "0.1.0"},
    "files": {"model.onnx": "ab" * 32},
}


class ReaderError(ValueError):
    """The reader's own error type: description.py raises whatever it is given."""


def _changed(*keys_and_value) -> dict:
    *keys, value = keys_and_value
    meta = copy.deepcopy(GOOD)
    target = meta
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return meta


def test_a_good_description_is_returned_as_it_is():
    assert check_export_meta(GOOD, "x/loraexport.json", ReaderError) is GOOD


def test_only_model_is_required():
    minimal = {"model": {"kind": "seq2seq", "special_tokens": {}}}
    assert check_export_meta(minimal, "m", ReaderError) is minimal


@pytest.mark.parametrize(
    "meta, message",
    [
        ([1], "x: not a loraexport export description (a JSON object), but an array [1]"),
        ({"graphs": {}}, "x: not a loraexport export description (no 'model' key)"),
        (_changed("model", "x"), "x: 'model' must be an object, not a string 'x'"),
        (
            _changed("model", "kind", "gan"),
            "x: 'model.kind' must be one of seq2seq, causal, encoder, not a string 'gan'",
        ),
        (_changed("model", "family", 3), "x: 'model.family' must be a string, not an integer 3"),
        (
            _changed("model", "special_tokens", None),
            "x: 'model.special_tokens' must be an object, not null None",
        ),
        (
            _changed("model", "special_tokens", "eos", 2.0),
            "'model.special_tokens.eos' must be an integer or null, not a number 2.0",
        ),
        (
            _changed("model", "special_tokens", "eos", True),
            "'model.special_tokens.eos' must be an integer or null, not a boolean True",
        ),
        (_changed("graphs", []), "x: 'graphs' must be an object, not an array []"),
        (_changed("graphs", "model", "inputs", [1]), "'graphs.model.inputs' must be an array of names"),
        (_changed("opset", "18"), "x: 'opset' must be an integer, not a string '18'"),
        (_changed("opset", True), "x: 'opset' must be an integer, not a boolean True"),
        (_changed("exporter", "onnxscript"), "'exporter' must be one of dynamo, torchscript, loraexport"),
        (
            _changed("weights_dtype", "int3"),
            "'weights_dtype' must be one of float32, float16, bfloat16, int8, int8-dynamic, int4",
        ),
        (_changed("graphs", "model", "logits", "first"), "'graphs.model.logits' must be one of all, last"),
        (
            _changed("graphs", "model", "kv_cache", ["growing"]),
            "'graphs.model.kv_cache' must be one of growing, shared-buffer, not an array",
        ),
        (_changed("optimize", "yes"), "x: 'optimize' must be an object, not a string 'yes'"),
        (_changed("mode", "both"), "'mode' must be one of merged, unmerged, adapter, base"),
        (_changed("files", {"a": 1}), "'files' must be an object of sha256 digests, not an object"),
    ],
)
def test_each_mistyped_key_is_named_with_its_value(meta, message):
    with pytest.raises(ReaderError) as e:
        check_export_meta(meta, "x", ReaderError)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_long_value_is_shortened_in_the_message():
    with pytest.raises(ReaderError) as e:
        check_export_meta(_changed("opset", "9" * 10_000), "x", ReaderError)
    assert len(str(e.value)) < 300


def test_the_choices_are_the_packages_own():
    from loraexport.export.onnx import MAX_OPSETS

    assert set(EXPORTERS) == set(MAX_OPSETS)  # every exporter export/onnx.py knows, no other
    assert KINDS == ("seq2seq", "causal", "encoder")
    for mode in ExportMode:
        check_export_meta(_changed("mode", mode.value), "x", ReaderError)
    for precision in Precision:
        check_export_meta(_changed("weights_dtype", precision.value), "x", ReaderError)


def test_read_export_meta(tmp_path):
    with pytest.raises(ReaderError, match="loraexport.json not found: not a loraexport output directory"):
        read_export_meta(tmp_path, ReaderError)
    (tmp_path / META).write_text("{not json")
    with pytest.raises(ReaderError, match="loraexport.json"):
        read_export_meta(tmp_path, ReaderError)
    (tmp_path / META).write_text(json.dumps(_changed("opset", "18")))
    with pytest.raises(ReaderError, match=f"{tmp_path / META}: 'opset' must be an integer"):
        read_export_meta(tmp_path, ReaderError)
    (tmp_path / META).write_text(json.dumps(GOOD))
    assert read_export_meta(str(tmp_path), ReaderError) == GOOD


def test_a_link_that_leads_nowhere_is_no_description(tmp_path):
    (tmp_path / META).symlink_to(tmp_path / "elsewhere.json")  # lexists: not "not found"
    with pytest.raises(ReaderError) as e:
        read_export_meta(tmp_path, ReaderError)
    assert "not a loraexport output directory" not in str(e.value)
