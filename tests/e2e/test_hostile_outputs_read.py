"""Outputs read back (``inspect``, ``verify --onnx``): mistyped descriptions, ONNX files too large
for protobuf, external data that ends too soon, and onnxruntime's own log kept off stderr.

Each case: exit 3, one line on stderr (``error: `` naming the file and the key), no traceback,
every input byte-identical afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from artifacts import VOCAB, copy_dir, edit_json, make_adapter, make_base
from clihelp import needs_bin, ok, peak_rss_mb, program, refused, run, untouched
from onnx import external_data_helper

from loraexport.core.untrusted import MAX_JSON_BYTES
from loraexport.runtime.model import MAX_ONNX_BYTES, OnnxModel, RuntimeInputError, check_export_meta

RSS_LIMIT_MB = 1024  # the bound for a hostile-size input
SPARSE_ONNX_BYTES = 6 * 1024**3  # `truncate -s 6G model.onnx`: costs no disk, 3x protobuf's limit


def _set(*keys_and_value):
    """A change that sets ``meta[k1][k2]... = value``."""
    *keys, value = keys_and_value

    def change(meta):
        target = meta
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return meta

    return change


# (change to loraexport.json, the key the error must name)
MISTYPED_META = [
    (lambda m: [m], "JSON object"),  # the whole file a list
    (lambda m: "x", "JSON object"),
    (_set("model", 5), "'model'"),
    (_set("model", "kind", 5), "'model.kind'"),
    (_set("model", "kind", "gan"), "'model.kind'"),
    (_set("model", "family", ["hf"]), "'model.family'"),
    (_set("model", "special_tokens", [1]), "'model.special_tokens'"),
    (lambda m: m["model"].pop("special_tokens") and m, "'model.special_tokens'"),
    (_set("model", "special_tokens", "eos", "2"), "'model.special_tokens.eos'"),
    (_set("files", 7), "'files'"),
    (_set("files", {"model.onnx": 7}), "'files'"),
    (_set("graphs", "x"), "'graphs'"),
    (_set("graphs", "model", 3), "'graphs.model'"),
    (_set("graphs", "model", "inputs", "input_ids"), "'graphs.model.inputs'"),
    (_set("opset", "18"), "'opset'"),
    (_set("opset", True), "'opset'"),
    (_set("exporter", 1), "'exporter'"),
    (_set("weights_dtype", "int3"), "'weights_dtype'"),
    (_set("mode", {}), "'mode'"),
    (_set("inputs", []), "'inputs'"),
]


@pytest.mark.parametrize("change, key", MISTYPED_META)
def test_inspect_mistyped_export_description(causal_onnx, tmp_path, change, key):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    edit_json(out / "loraexport.json", change)
    with untouched(tmp_path):
        refused(run("inspect", out), 3, "loraexport.json", key)


@pytest.mark.parametrize(
    "report, key",
    [("[true]", "report.json"), ('{"passed": "yes"}', "'passed'"), ('{"passed": 1}', "'passed'")],
)
def test_inspect_mistyped_report(causal_onnx, tmp_path, report, key):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    (out / "report.json").write_text(report)
    with untouched(tmp_path):
        refused(run("inspect", out), 3, "report.json", key)


def test_inspect_reads_a_good_report(causal_onnx, tmp_path):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    (out / "report.json").write_text('{"passed": false}')
    r = ok(run("inspect", out, "--json"))
    info = json.loads(r.stdout)
    assert info["parity_passed"] is False and info["model"] == "causal" and info["opset"] == 18


@pytest.mark.parametrize("manifest, key", [('{"files": 7}', "'files'"), ("[1, 2]", "JSON object")])
def test_inspect_mistyped_manifest_of_another_output(causal_adapter, tmp_path, manifest, key):
    """An adapter (no "graphs") carries a manifest too: it must be an object of digests."""
    out = copy_dir(causal_adapter, tmp_path / "adapter")
    (out / "loraexport.json").write_text(manifest)
    with untouched(tmp_path):
        refused(run("inspect", out), 3, "loraexport.json", key)


# verify reads weights_dtype itself before opening the export (pipeline.verify): exit 3 too,
# but in its own words, which do not name the file.
@pytest.mark.parametrize("change, key", [c for c in MISTYPED_META if c[1] != "'weights_dtype'"])
def test_verify_mistyped_export_description(causal_base, causal_adapter, causal_onnx, tmp_path, change, key):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    edit_json(out / "loraexport.json", change)
    with untouched(tmp_path):
        r = run("verify", "--base", causal_base, "--adapter", causal_adapter, "--onnx", out, "--no-latency")
        refused(r, 3, "loraexport.json", key)


def test_runtime_reads_the_description_bounded(causal_onnx, tmp_path):
    """OnnxModel (the app-facing runtime) caps loraexport.json before reading it."""
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    with open(out / "loraexport.json", "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing is allocated
    with pytest.raises(RuntimeInputError, match="loraexport.json.*over the"):
        OnnxModel(out)
    (out / "loraexport.json").unlink()
    os.mkfifo(out / "loraexport.json")  # would block a reader forever
    with pytest.raises(RuntimeInputError, match="not a regular file"):
        OnnxModel(out)


def test_check_export_meta_accepts_what_export_writes(causal_onnx, seq2seq_onnx):
    for d in (causal_onnx, seq2seq_onnx):
        meta = json.loads((d / "loraexport.json").read_text())
        assert check_export_meta(meta, d, RuntimeInputError) is meta


# ---- ONNX files and their external data: sizes checked before reading --------------------------
def _verify_args(base, adapter, onnx_dir):
    return (
        "verify",
        "--base",
        base,
        "--adapter",
        adapter,
        "--onnx",
        onnx_dir,
        "--no-latency",
        "--samples",
        "1",
    )


def test_onnx_over_protobufs_limit_is_refused_unread(causal_base, causal_adapter, causal_onnx, tmp_path):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    os.truncate(out / "model.onnx", SPARSE_ONNX_BYTES)
    assert SPARSE_ONNX_BYTES > MAX_ONNX_BYTES
    with untouched(tmp_path, digests=False):  # sha256 would read 6 GB of zeros
        refused(run(*_verify_args(causal_base, causal_adapter, out)), 3, "model.onnx", "2 GiB")


@pytest.mark.slow
@needs_bin
def test_onnx_over_protobufs_limit_costs_no_memory(causal_base, causal_adapter, causal_onnx, tmp_path):
    """The issue's recipe: `truncate -s 6G model.onnx`, verify; peak RSS stays under 1 GB."""
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    os.truncate(out / "model.onnx", SPARSE_ONNX_BYTES)
    r, rss_mb = peak_rss_mb(*_verify_args(causal_base, causal_adapter, out))
    refused(r, 3, "model.onnx", "2 GiB")
    assert rss_mb < RSS_LIMIT_MB, rss_mb


def _externalize(onnx_dir: Path, **overrides) -> str:
    """Move the largest initializer of model.onnx to model.onnx.data; ``overrides`` change its
    external-data entries (offset, length). Returns the tensor's name."""
    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = weight.raw_data
    (onnx_dir / "model.onnx.data").write_bytes(data)
    external_data_helper.set_external_data(weight, "model.onnx.data", offset=0, length=len(data))
    for entry in weight.external_data:  # written as the file has them: strings, maybe not numbers
        entry.value = str(overrides.get(entry.key, entry.value))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    onnx.save(model, str(path))
    return weight.name


def test_external_data_in_bounds_still_loads(causal_onnx, tmp_path):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    _externalize(out)
    assert OnnxModel(out).kind == "causal"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"offset": 64}, "refusing"),  # offset + length past the end
        ({"length": 10**12}, "refusing"),
        ({"offset": "-1"}, "not a non-negative integer"),
        ({"offset": "0x10"}, "not a non-negative integer"),
    ],
)
def test_external_data_outside_its_file_is_refused(
    causal_base, causal_adapter, causal_onnx, tmp_path, overrides, needle
):
    """onnxruntime maps external data: a tensor past the file's end would be read past the
    mapping (SIGBUS), so bounds are checked first."""
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    name = _externalize(out, **overrides)
    with untouched(tmp_path):
        refused(run(*_verify_args(causal_base, causal_adapter, out)), 3, "model.onnx", name, needle)


def test_external_data_that_is_a_fifo_is_refused_unopened(causal_onnx, tmp_path):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    _externalize(out)
    (out / "model.onnx.data").unlink()
    os.mkfifo(out / "model.onnx.data")
    with pytest.raises(RuntimeInputError, match="not a regular file"):
        OnnxModel(out)


def test_onnx_file_that_is_a_fifo_is_refused_unopened(causal_onnx, tmp_path):
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    (out / "model.onnx").unlink()
    os.mkfifo(out / "model.onnx")
    with pytest.raises(RuntimeInputError, match="not a regular file"):
        OnnxModel(out)


# ---- onnxruntime's log ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wider_vocab(tmp_path_factory) -> tuple[Path, Path]:
    """A causal base (and adapter) with more tokens than causal_onnx embeds."""
    root = tmp_path_factory.mktemp("wider-vocab")
    base = make_base(root / "base", n_encoder_layers=0, vocab=VOCAB + list("abcdefghijklmnopqrstuvwxyz"))
    return base, make_adapter(base, root / "adapter", seed=2)


@pytest.mark.slow
@needs_bin
def test_onnx_of_another_model_prints_one_line_only(wider_vocab, causal_onnx, tmp_path):
    """onnxruntime logs a failed run on fd 2 itself (ANSI-coloured, before our line): only the
    real process's stderr shows it, so the console script runs as a subprocess."""
    base, adapter = wider_vocab
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    with untouched(tmp_path):
        r = program(
            "verify", "--base", base, "--adapter", adapter, "--onnx", out, "--no-latency", "--samples", "3"
        )
        line = refused(r, 3, "is an export of another model: a vocabulary of")
        assert "\x1b[" not in r.stderr and "[E:onnxruntime" not in r.stderr, line
