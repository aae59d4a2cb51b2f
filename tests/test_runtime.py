"""``runtime.py``, the onnxruntime-only API for apps: positions, the empty cache, session
options, ``OnnxModel`` (its description given or read, forward, generate) and
``check_external_data``; and no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from artifacts import VOCAB, copy_dir, random_batch
from onnx import helper, numpy_helper

from loraexport.runtime.model import (
    MAX_ONNX_BYTES,
    OnnxModel,
    RuntimeInputError,
    check_external_data,
    empty_past,
    open_session,
    positions,
    session_options,
)

NEW_TOKENS = 5
# Causal exports of the tiny model: 2 decoder layers, 2 heads of 16 / 2 = 8 dimensions.
CAUSAL_CACHE = (2, 2, 8)


def _meta(onnx_dir) -> dict:
    return json.loads((onnx_dir / "loraexport.json").read_text())


def _greedy_without_cache(model: OnnxModel, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding by full forwards (no cache): what ``generate`` must reproduce with one."""
    new = []
    if model.kind == "seq2seq":
        dec = np.full((ids.shape[0], 1), model.tokens["bos"], dtype=np.int64)
        for _ in range(steps):
            nxt = model.forward(ids, mask, dec)[:, -1].argmax(-1)[:, None]
            new.append(nxt)
            dec = np.concatenate([dec, nxt], axis=1)
    else:
        for _ in range(steps):
            nxt = model.forward(ids, mask)[:, -1].argmax(-1)[:, None]
            new.append(nxt)
            ids, mask = np.concatenate([ids, nxt], axis=1), np.concatenate([mask, np.ones_like(nxt)], axis=1)
    return np.concatenate(new, axis=1)


def _numpy_batch(batch: int, seq: int, seed: int, seq2seq: bool) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in random_batch(batch, seq, seed=seed, seq2seq=seq2seq).items()}


# ---- small functions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mask, expected",
    [
        ([[1, 1, 1]], [[0, 1, 2]]),
        ([[0, 0, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 1], [0, 1, 2, 3]]),  # left padding counts nothing
        ([[0, 0]], [[0, 0]]),
    ],
)
def test_positions_count_unmasked_tokens(mask, expected):
    got = positions(np.array(mask))
    assert got.dtype == np.int64 and got.tolist() == expected


def test_empty_past_is_a_zero_length_cache_per_layer():
    past = empty_past(3, 2, 4, 8, np.float32)
    assert sorted(past) == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert all(v.shape == (3, 4, 0, 8) and v.dtype == np.float32 for v in past.values())
    assert empty_past(1, 0, 4, 8, np.float32) == {}


@pytest.mark.parametrize("threads, expected", [(None, 0), (3, 3)])  # 0: onnxruntime's default
def test_session_options_fix_threads_and_never_spin(threads, expected):
    so = session_options(threads)
    assert so.intra_op_num_threads == expected and so.inter_op_num_threads == 1
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.log_severity_level == 4  # fatal only: every error is raised, and said once


def test_open_session_refuses_an_unknown_or_missing_provider(causal_onnx):
    with pytest.raises(RuntimeInputError, match="unknown provider 'tpu'; choose from cpu, cuda"):
        open_session(causal_onnx / "model.onnx", provider="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeInputError, match="no CUDAExecutionProvider on this machine"):
            open_session(causal_onnx / "model.onnx", provider="cuda")


# ---- check_external_data ---------------------------------------------------------------------------
def _weights_graph(path, external: bool) -> np.ndarray:
    """``y = x + w`` (w: 64 float32) saved at ``path``, w in ``path.data`` when ``external``."""
    w = np.arange(64, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(
        model, str(path), save_as_external_data=external, location=f"{path.name}.data", size_threshold=0
    )
    return w


@pytest.mark.parametrize("external", [False, True])
def test_check_external_data_passes_a_model_whose_data_is_beside_it(tmp_path, external):
    w = _weights_graph(tmp_path / "m.onnx", external)
    assert (tmp_path / "m.onnx.data").exists() == external
    check_external_data(tmp_path / "m.onnx")  # no error
    x = np.ones(64, dtype=np.float32)
    (y,) = open_session(tmp_path / "m.onnx").run(None, {"x": x})
    assert np.array_equal(y, x + w)


def test_check_external_data_refuses_what_is_no_model(tmp_path):
    with pytest.raises(RuntimeInputError, match="ONNX file not found"):
        check_external_data(tmp_path / "missing.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(RuntimeInputError, match="not a regular file"):
        check_external_data(tmp_path / "dir.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(RuntimeInputError, match="not a readable ONNX model"):
        check_external_data(tmp_path / "junk.onnx")
    with open(tmp_path / "huge.onnx", "wb") as f:
        f.truncate(MAX_ONNX_BYTES + 1)  # sparse: refused by its size, not read
    with pytest.raises(RuntimeInputError, match="over protobuf's 2 GiB limit"):
        check_external_data(tmp_path / "huge.onnx")


def test_check_external_data_refuses_data_outside_or_too_short(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    _weights_graph(d / "m.onnx", external=True)
    os.rename(d / "m.onnx.data", tmp_path / "m.onnx.data")
    (d / "m.onnx.data").symlink_to(tmp_path / "m.onnx.data")  # a link leading out of the folder
    with pytest.raises(RuntimeInputError, match="points outside"):
        check_external_data(d / "m.onnx")
    (d / "m.onnx.data").unlink()
    (d / "m.onnx.data").write_bytes(b"\0" * 100)  # 64 float32 need 256 bytes
    with pytest.raises(
        RuntimeInputError, match=r"tensor 'w' needs bytes 0\.\.256 of m\.onnx\.data, which holds 100"
    ):
        check_external_data(d / "m.onnx")


# ---- OnnxModel: its description ---------------------------------------------------------------------
def test_the_description_is_read_from_disk(causal_onnx):
    model = OnnxModel(causal_onnx)
    assert model.meta == _meta(causal_onnx) and model.kind == "causal"
    assert model.tokens == _meta(causal_onnx)["model"]["special_tokens"]
    assert set(model.sessions) == {"model"} and model.cache_shape == CAUSAL_CACHE


def test_a_description_given_is_used_instead_of_the_file(causal_onnx, tmp_path):
    """A pipeline checks its export before writing loraexport.json: ``meta=`` needs no file."""
    out = copy_dir(causal_onnx, tmp_path / "onnx")
    meta = _meta(out)
    (out / "loraexport.json").unlink()
    with pytest.raises(RuntimeInputError, match="loraexport.json not found"):
        OnnxModel(out)
    model = OnnxModel(out, meta=meta)
    assert model.meta is meta and model.kind == "causal"


def test_a_description_given_is_checked_all_the_same(causal_onnx):
    meta = _meta(causal_onnx)
    meta["model"]["kind"] = "gan"
    with pytest.raises(RuntimeInputError, match=r"loraexport\.json: 'model\.kind' must be one of"):
        OnnxModel(causal_onnx, meta=meta)


def test_seq2seq_has_two_sessions(seq2seq_onnx):
    model = OnnxModel(seq2seq_onnx)
    assert model.kind == "seq2seq" and set(model.sessions) == {"encoder", "decoder"}
    assert "encoder_attention_mask" in model.input_names["decoder"]


def test_an_encoder_does_not_generate(causal_onnx):
    model = OnnxModel(causal_onnx)
    model.kind = "encoder"  # (an encoder export has no cache: the check comes before any run)
    with pytest.raises(RuntimeInputError, match="an encoder model does not generate"):
        model.generate(np.ones((1, 2), dtype=np.int64), np.ones((1, 2), dtype=np.int64), 3)


# ---- OnnxModel: forward and generate ---------------------------------------------------------------
def test_forward_all_of_a_causal_export(causal_onnx):
    model = OnnxModel(causal_onnx)
    x = _numpy_batch(2, 6, seed=1, seq2seq=False)
    outs = model.forward_all(x["input_ids"], x["attention_mask"])
    assert all(k.startswith("model.") for k in outs)
    assert outs["model.logits"].shape == (2, 6, len(VOCAB))
    layers, heads, head_dim = CAUSAL_CACHE
    for i in range(layers):  # a full forward returns the whole cache: (B, H, T, Dh)
        assert outs[f"model.present.{i}.key"].shape == (2, heads, 6, head_dim)
    assert np.array_equal(model.forward(x["input_ids"], x["attention_mask"]), outs["model.logits"])


def test_forward_all_of_a_seq2seq_export(seq2seq_onnx):
    model = OnnxModel(seq2seq_onnx)
    x = _numpy_batch(3, 5, seed=2, seq2seq=True)
    outs = model.forward_all(**x)
    assert {k.split(".")[0] for k in outs} == {"encoder", "decoder"}
    assert outs["decoder.logits"].shape == (3, 5, len(VOCAB))
    assert np.array_equal(model.forward(**x), outs["decoder.logits"])


@pytest.mark.parametrize("which", ["causal", "seq2seq"])
def test_generate_with_the_cache_matches_greedy_full_forwards(which, request):
    """Exact equality: both paths compute the same logits to ~1e-6 (ORT_ATOL), and the tiny
    models' greedy choices here are not within that of a tie (fixed seeds)."""
    model = OnnxModel(request.getfixturevalue(f"{which}_onnx"))
    x = _numpy_batch(2, 4, seed=3, seq2seq=False)
    got = model.generate(x["input_ids"], x["attention_mask"], NEW_TOKENS)
    assert got.shape == (2, NEW_TOKENS) and got.dtype == np.int64
    want = _greedy_without_cache(model, x["input_ids"], x["attention_mask"], NEW_TOKENS)
    assert np.array_equal(got, want)


def test_causal_generate_ignores_left_padding(causal_onnx):
    """A left-padded row decodes as the same prompt alone: positions skip the padding."""
    model = OnnxModel(causal_onnx)
    x = _numpy_batch(1, 4, seed=4, seq2seq=False)
    alone = model.generate(x["input_ids"], x["attention_mask"], NEW_TOKENS)
    pad = model.tokens.get("pad") or 0
    ids = np.concatenate([np.full((1, 2), pad, dtype=np.int64), x["input_ids"]], axis=1)
    mask = np.concatenate([np.zeros((1, 2), dtype=np.int64), x["attention_mask"]], axis=1)
    assert np.array_equal(model.generate(ids, mask, NEW_TOKENS), alone)


def test_generate_one_token(causal_onnx):
    model = OnnxModel(causal_onnx)
    x = _numpy_batch(3, 3, seed=5, seq2seq=False)
    first = model.forward(x["input_ids"], x["attention_mask"])[:, -1].argmax(-1)
    assert model.generate(x["input_ids"], x["attention_mask"], 1).tolist() == [[t] for t in first]


# ---- no torch ------------------------------------------------------------------------------------
def test_runtime_imports_no_torch():
    code = "import sys, loraexport.runtime; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
