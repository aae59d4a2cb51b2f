"""``merge-and-export --mode adapter``, ``export --mode adapter`` and ``convert-adapter`` through
the real CLI: files, report, and one test per refusal (each one line, exit 3 or 2, nothing
written)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from artifacts import HF_TARGETS, make_hf_decoder
from clihelp import QUICK, ok, refused, run, untouched
from tamper import restamp

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow


def _adapter(base_dir, out, seed: int, **config) -> None:
    model = make_hf_decoder(base_dir.parent / f"scratch-{seed}", "llama", **config.pop("base", {}))
    targets = config.pop("targets", HF_TARGETS["llama"])
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_pretrained(out)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny Llama, three adapters, and ``merge-and-export --mode adapter`` of them (verified)."""
    tmp = tmp_path_factory.mktemp("served")
    make_hf_decoder(tmp / "base", "llama")
    _adapter(tmp / "base", tmp / "r8", 1, r=8, lora_alpha=16)
    _adapter(tmp / "base", tmp / "r4-rslora", 2, r=4, lora_alpha=8, use_rslora=True)
    _adapter(tmp / "base", tmp / "r2", 3, r=2, lora_alpha=4, rank_pattern={"layers.0.self_attn.q_proj": 1})
    adapters = [a for n in ("r8", "r4-rslora", "r2") for a in ("--adapter", tmp / n)]
    r = serve(tmp, tmp / "onnx", *adapters, "--samples", "2")
    ok(r)
    return tmp, json.loads(r.stdout)


def serve(tmp, out, *args):
    """``merge-and-export --mode adapter --json`` on the fixture's base with ``args`` (the
    adapters and any options); the result, its exit not yet checked."""
    return run("merge-and-export", "--base", tmp / "base", *args, "--out", out, "--mode", "adapter", "--json")


def test_merge_and_export_writes_and_verifies_one_file_per_adapter(served):
    tmp, report = served
    meta = json.loads((tmp / "onnx" / "loraexport.json").read_text())
    assert meta["mode"] == "adapter" and meta["lora_inputs"]["rank"] == 8
    files = meta["adapter_files"]
    assert [f["name"] for f in files] == ["r8", "r4-rslora", "r2"]
    for f in files:
        assert hashlib.sha256((tmp / "onnx" / f["file"]).read_bytes()).hexdigest() == f["sha256"]
    assert report["passed"] is True
    checked = sorted(report["parity_by_provider"])
    assert checked == sorted(f"cpu, adapter {n}" for n in ("r8", "r4-rslora", "r2", "none"))
    mode = report["adapter_mode"]
    assert [a["name"] for a in mode["adapters"]] == ["r8", "r4-rslora", "r2"]
    # timings are reported, not judged here (README quotes the real model's)
    assert all(
        isinstance(a["load_ms"], float) and isinstance(a["activation_ms"], float) for a in mode["adapters"]
    )
    assert [(row["batch"], row["seq"]) for row in mode["latency"]] == [(1, 32), (4, 32)]
    assert "Adapters per request" in (tmp / "onnx" / "report.md").read_text()


def test_convert_adapter_writes_the_same_tensors_as_the_export(served, tmp_path):
    tmp, _ = served
    out = tmp_path / "again.onnx_adapter"
    ok(run("convert-adapter", tmp / "r4-rslora", "--onnx", tmp / "onnx", "--out", out))
    fresh, stored = (
        ort.AdapterFormat.read_adapter(str(out)),
        ort.AdapterFormat.read_adapter(str(tmp / "onnx" / "r4-rslora.onnx_adapter")),
    )
    a, b = fresh.get_parameters(), stored.get_parameters()
    assert sorted(a) == sorted(b) and len(a) == 8  # 2 layers × (q, v) × (A, B)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy())


@pytest.mark.parametrize(
    "make, needles",
    [
        ({"r": 16, "lora_alpha": 16}, ("rank 16 exceeds the graph's rank 8", "--max-rank 16")),
        ({"r": 4, "lora_alpha": 8, "targets": ["k_proj"]}, ("k_proj", "no LoRA input for this module")),
        ({"r": 4, "lora_alpha": 8, "base": {"hidden_size": 64}}, ("q_proj", "another base")),
        ({"r": 4, "lora_alpha": 8, "use_dora": True}, ("DoRA",)),
    ],
    ids=["rank-too-high", "module-not-in-graph", "other-base", "dora"],
)
def test_convert_adapter_refuses_what_the_graph_cannot_take(served, tmp_path, make, needles):
    tmp, _ = served
    _adapter(tmp_path / "base", tmp_path / "adapter", 7, **make)
    out = tmp_path / "x.onnx_adapter"
    with untouched(tmp / "onnx"):
        refused(
            run("convert-adapter", tmp_path / "adapter", "--onnx", tmp / "onnx", "--out", out), 3, *needles
        )
    assert not out.exists()


def test_convert_adapter_needs_an_adapter_mode_export(served, tmp_path):
    tmp, _ = served
    ok(run("export", "--model", tmp / "base", "--adapter", tmp / "r8", "--out", tmp_path / "merged"))
    refused(
        run(
            "convert-adapter", tmp / "r8", "--onnx", tmp_path / "merged", "--out", tmp_path / "x.onnx_adapter"
        ),
        3,
        "not an adapter-mode export",
    )


def test_convert_adapter_does_not_overwrite_without_force(served, tmp_path):
    """An adapter file it wrote is replaced with --force only; another file, never."""
    tmp, _ = served
    out = tmp_path / "taken.onnx_adapter"
    ok(run("convert-adapter", tmp / "r4-rslora", "--onnx", tmp / "onnx", "--out", out))
    before = out.read_bytes()
    refused(run("convert-adapter", tmp / "r8", "--onnx", tmp / "onnx", "--out", out), 3, str(out))
    assert out.read_bytes() == before
    ok(run("convert-adapter", tmp / "r8", "--onnx", tmp / "onnx", "--out", out, "--force"))
    assert out.read_bytes() != before
    mine = tmp_path / "mine.onnx_adapter"
    mine.write_bytes(b"mine")
    args = ("convert-adapter", tmp / "r8", "--onnx", tmp / "onnx", "--out", mine, "--force")
    refused(run(*args), 3, "no onnxruntime adapter file")
    assert mine.read_bytes() == b"mine"


def test_convert_adapter_output_inside_an_input_is_refused(served):
    tmp, _ = served
    refused(
        run("convert-adapter", tmp / "r8", "--onnx", tmp / "onnx", "--out", tmp / "r8" / "x.onnx_adapter"),
        2,
        "sits inside the ADAPTER_DIR",
    )


@pytest.mark.parametrize(
    "extra, needles",
    [
        (("--max-rank", "0"), ("--max-rank",)),
        (("--weight", "0.5"), ("--weight", "--mode adapter")),
    ],
    ids=["max-rank-0", "weight"],
)
def test_adapter_mode_options_that_cannot_work(served, tmp_path, extra, needles):
    tmp, _ = served
    r = run(
        "export",
        "--model",
        tmp / "base",
        "--adapter",
        tmp / "r8",
        "--out",
        tmp_path / "o",
        "--mode",
        "adapter",
        *extra,
    )
    refused(r, 2 if extra[0] == "--max-rank" else 3, *needles)
    assert not (tmp_path / "o").exists()


def test_adapter_mode_needs_an_adapter(served, tmp_path):
    tmp, _ = served
    refused(
        run("export", "--model", tmp / "base", "--out", tmp_path / "o", "--mode", "adapter"),
        3,
        "--mode adapter needs an --adapter",
    )


def test_export_max_rank_pads_every_adapter(served, tmp_path):
    """--max-rank 12: the graph's factors are rank 12; an r=8 adapter is zero-padded and still
    PEFT's (verify auto-detects the mode). ``QUICK``: parity on two cases, no latency."""
    tmp, _ = served
    out = tmp_path / "wide"
    ok(
        run(
            "export",
            "--model",
            tmp / "base",
            "--adapter",
            tmp / "r8",
            "--out",
            out,
            "--mode",
            "adapter",
            "--max-rank",
            "12",
        )
    )
    meta = json.loads((out / "loraexport.json").read_text())
    assert meta["lora_inputs"]["rank"] == 12
    assert all(12 in v["shape"] for v in meta["lora_inputs"]["inputs"].values())
    r = run("verify", "--base", tmp / "base", "--adapter", tmp / "r4-rslora", "--onnx", out, *QUICK, "--json")
    ok(r)
    assert json.loads(r.stdout)["passed"] is True


def test_convert_adapter_out_must_be_an_adapter_file_name(served, tmp_path):
    tmp, _ = served
    refused(
        run("convert-adapter", tmp / "r8", "--onnx", tmp / "onnx", "--out", tmp_path / "x.bin"),
        2,
        ".onnx_adapter",
    )


def test_a_quantized_base_keeps_every_adapter_in_float32(served, tmp_path):
    """--mode adapter --quantize int8: the base quantized, the LoRA inputs float32; each adapter
    judged like a kept adapter (``adapter_retained`` against its own unmerged model, the same
    graph with no adapter active as the quantized base)."""
    tmp, _ = served
    out = tmp_path / "q"
    args = ("--adapter", tmp / "r8", "--adapter", tmp / "r4-rslora")
    r = serve(tmp, out, *args, "--quantize", "int8", *QUICK)
    ok(r)
    report = json.loads(r.stdout)
    assert [q["adapter"] for q in report["quantization"]] == [
        "r8: kept in float32 (adapter mode)",
        "r4-rslora: kept in float32 (adapter mode)",
    ]
    assert all(q["adapter_retained"] > 0.9 for q in report["quantization"])
    meta = json.loads((out / "loraexport.json").read_text())
    assert meta["weights_dtype"] == "int8" and meta["quantization"]["adapter"] == "kept in float32"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    lora = [i for i in session.get_overridable_initializers() if ".lora_" in i.name]
    assert len(lora) == 8 and all(i.type == "tensor(float)" for i in lora)


def test_verify_mode_must_be_the_exports(served, tmp_path):
    tmp, _ = served
    ok(run("export", "--model", tmp / "base", "--adapter", tmp / "r8", "--out", tmp_path / "merged"))
    common = ("verify", "--base", tmp / "base", "--adapter", tmp / "r8")
    refused(
        run(*common, "--onnx", tmp_path / "merged", "--mode", "adapter", *QUICK),
        3,
        "exported with mode merged",
    )
    weighted = (*common, "--adapter", tmp / "r2", "--weight", "1", "--weight", "0.5", "--onnx", tmp / "onnx")
    refused(run(*weighted, *QUICK), 3, "--weight does not apply to an adapter-mode export")
    ok(run(*common, "--onnx", tmp / "onnx", "--mode", "adapter", *QUICK))


def test_a_half_stored_base_keeps_the_adapter_inputs_float32(served, tmp_path):
    """--mode adapter --dtype bfloat16: the base's weights stored in bfloat16 (rounded once),
    the adapter inputs float32; each adapter passes parity against its own unmerged model on
    the rounded base (what the file holds exactly)."""
    tmp, _ = served
    out = tmp_path / "bf16"
    args = ("--adapter", tmp / "r8", "--adapter", tmp / "r2")
    r = serve(tmp, out, *args, "--dtype", "bfloat16", *QUICK)
    ok(r)
    assert json.loads(r.stdout)["passed"] is True
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert sum(v == onnx.TensorProto.BFLOAT16 for v in types.values()) >= 8  # the projections and more
    lora = [n for n in types if ".lora_" in n]
    assert len(lora) == 8 and all(types[n] == onnx.TensorProto.FLOAT for n in lora)


@pytest.mark.parametrize(
    "tamper, needle",
    [
        (lambda m: m["lora_inputs"].update(rank="8"), "lora_inputs.rank"),
        (lambda m: m["lora_inputs"].update(rank=10**9), "lora_inputs.rank"),
        (lambda m: m["lora_inputs"].update(inputs=[]), "lora_inputs.inputs"),
        (
            lambda m: next(iter(m["lora_inputs"]["inputs"].values())).update(shape=[8, -1]),
            "is not a LoRA input",
        ),
        (lambda m: next(iter(m["lora_inputs"]["inputs"].values())).update(factor="C"), "is not a LoRA input"),
        (lambda m: m["adapter_files"][0].update(file="../r8/adapter_config.json"), "adapter_files"),
        (lambda m: m["adapter_files"][0].update(file=".."), "adapter_files"),
        (lambda m: m["lora_inputs"]["inputs"].pop(next(iter(m["lora_inputs"]["inputs"]))), "other factor"),
    ],
    ids=[
        "rank-text",
        "rank-huge",
        "inputs-list",
        "shape-negative",
        "factor",
        "file-outside",
        "file-dots",
        "pair",
    ],
)
def test_a_tampered_description_is_refused_in_one_line(served, tmp_path, tamper, needle):
    """loraexport.json is input like any other: convert-adapter and verify refuse what does not
    describe an adapter-mode graph (exit 3), and nothing outside the export is read as an adapter."""
    import shutil

    tmp, _ = served
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tmp / "onnx", onnx_dir)
    meta = json.loads((onnx_dir / "loraexport.json").read_text())
    tamper(meta)
    (onnx_dir / "loraexport.json").write_text(json.dumps(meta))
    restamp(onnx_dir)  # its own digest made to agree (else verify: exit 4, the description edited)
    if needle == "adapter_files":
        r = run("verify", "--base", tmp / "base", "--adapter", tmp / "r8", "--onnx", onnx_dir, *QUICK)
    else:
        r = run("convert-adapter", tmp / "r8", "--onnx", onnx_dir, "--out", tmp_path / "x.onnx_adapter")
    refused(r, 3, needle)


def test_an_adapter_of_fewer_modules_leaves_the_others_at_zero(served, tmp_path):
    """An adapter on q_proj only, for a graph adapting q_proj and v_proj: converted (4 tensors,
    v_proj's inputs left at their zero defaults) and verified against its own unmerged model."""
    tmp, _ = served
    _adapter(tmp_path / "base", tmp_path / "q-only", 9, r=4, lora_alpha=4, targets=["q_proj"])
    out = tmp_path / "q-only.onnx_adapter"
    ok(run("convert-adapter", tmp_path / "q-only", "--onnx", tmp / "onnx", "--out", out))
    assert sorted(ort.AdapterFormat.read_adapter(str(out)).get_parameters()) == sorted(
        f"model.layers.{i}.self_attn.q_proj.lora_{f}.weight" for i in range(2) for f in "AB"
    )
    r = run(
        "verify",
        "--base",
        tmp / "base",
        "--adapter",
        tmp_path / "q-only",
        "--onnx",
        tmp / "onnx",
        *QUICK,
        "--json",
    )
    ok(r)
    assert json.loads(r.stdout)["passed"] is True


def test_convert_adapter_into_the_export_folder(served, tmp_path):
    """The documented workflow: a new adapter file beside the graph (loraexport.runtime finds
    it there); the export's own files, its listed adapter files included, are never written."""
    import shutil

    from loraexport.runtime.model import OnnxModel

    tmp, _ = served
    onnx_dir = tmp_path / "served"
    shutil.copytree(tmp / "onnx", onnx_dir)
    _adapter(tmp_path / "base", tmp_path / "a3", 11, r=4, lora_alpha=8)
    ok(run("convert-adapter", tmp_path / "a3", "--onnx", onnx_dir, "--out", onnx_dir / "a3.onnx_adapter"))
    assert "a3" in OnnxModel(onnx_dir).adapters
    for own in ("r8.onnx_adapter", "loraexport.json"):
        args = ("convert-adapter", tmp_path / "a3", "--onnx", onnx_dir, "--out", onnx_dir / own, "--force")
        with untouched(onnx_dir):
            refused(run(*args), 2)


def test_adapters_with_different_modules_in_any_order(served, tmp_path):
    """The graph adapts the union of the adapters' modules, whatever their order: q only, then
    q and v; each verified against its own model."""
    tmp, _ = served
    _adapter(tmp_path / "base", tmp_path / "q-only", 12, r=2, lora_alpha=2, targets=["q_proj"])
    args = ("--adapter", tmp_path / "q-only", "--adapter", tmp / "r8")
    r = serve(tmp, tmp_path / "o", *args, *QUICK)
    ok(r)
    report = json.loads(r.stdout)
    assert report["passed"] is True and len(report["parity_by_provider"]) == 3
    meta = json.loads((tmp_path / "o" / "loraexport.json").read_text())
    assert len(meta["lora_inputs"]["inputs"]) == 8  # 2 layers × (q, v) × (A, B)


def test_max_rank_below_an_adapters_rank_is_refused(served, tmp_path):
    tmp, _ = served
    args = ("export", "--model", tmp / "base", "--adapter", tmp / "r8", "--out", tmp_path / "o")
    refused(run(*args, "--mode", "adapter", "--max-rank", "4"), 3, "--max-rank 4 is below", "8")
    assert not (tmp_path / "o").exists()


def test_verify_names_every_adapter_once(served, tmp_path):
    """Three copies of r2 (one matched to the export's own r2 file by its sha256, the others
    converted) get unique names; a folder called "none" is not taken for the no-adapter check."""
    import shutil

    tmp, _ = served
    for where in ("x/adapter", "y/adapter", "none"):
        shutil.copytree(tmp / "r2", tmp_path / where)
    args = [a for w in ("x/adapter", "y/adapter", "none") for a in ("--adapter", tmp_path / w)]
    r = run("verify", "--base", tmp / "base", *args, "--onnx", tmp / "onnx", *QUICK, "--json")
    ok(r)
    names = sorted(json.loads(r.stdout)["parity_by_provider"])
    assert names == sorted(f"cpu, adapter {n}" for n in ("r2", "adapter", "none-2", "none"))


def test_an_adapter_file_larger_than_its_inputs_is_refused_unread(served, tmp_path, monkeypatch):
    """A 3 GB ``.onnx_adapter`` (sparse) is refused by its size against the export's LoRA inputs,
    before onnxruntime reads a byte (it used to read 3.1 GB for 20 s first); the export's own
    adapter files fit the bound and still load (issue 26)."""
    import os
    import time

    import numpy as np
    import onnxruntime as ort

    from loraexport.runtime.model import OnnxModel, RuntimeInputError

    tmp, _ = served
    model = OnnxModel(tmp / "onnx")
    big = tmp_path / "big.onnx_adapter"
    with open(big, "wb") as f:
        os.truncate(f.fileno(), 3 * 1024**3)
    monkeypatch.setattr(ort.AdapterFormat, "read_adapter", lambda *a: pytest.fail("the file was read"))
    ids = np.array([[5, 6, 7]])
    t0 = time.perf_counter()
    with pytest.raises(RuntimeInputError, match="more than an adapter of this export's LoRA inputs can hold"):
        model.forward(ids, np.ones_like(ids), adapter=big)
    assert time.perf_counter() - t0 < 2
    monkeypatch.undo()
    for name in model.adapters:  # each real adapter file is within the bound
        assert np.isfinite(model.forward(ids, np.ones_like(ids), adapter=name)).all()
