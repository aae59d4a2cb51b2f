"""``--stream`` through the CLI: merge-and-export and export of a checkpoint read tensor by tensor,
verified against the layer-streamed reference, with each stage's time and memory in the report;
PEFT is the oracle of what the export generates; what the streamed path cannot do is refused in
one line before any work."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from artifacts import MEMORY_MODEL, make_hf_decoder, make_peft_adapter
from clihelp import leftovers, ok, refused, run, untouched

from loraexport.runtime.model import OnnxModel

pytestmark = pytest.mark.slow  # exports and onnxruntime sessions: seconds each


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed-cli")
    model = make_hf_decoder(root / "base", "llama")
    peft_model = make_peft_adapter(copy.deepcopy(model), root / "adapter", "llama")
    return root / "base", root / "adapter", peft_model


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_merge_and_export_streamed_passes_and_generates_peft_tokens(llama, tmp_path):
    base, adapter, peft_model = llama
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--stream"))
    report = _report(out)
    assert report["passed"] is True and report["parity"]["cases"][0]["outputs"][0]["passed"]
    assert report["parity"]["generation"]["identical_rows"] == report["parity"]["generation"]["rows"] == 2
    names = [s["name"] for s in report["stages"]]
    assert names[0].startswith("load") and names[1].startswith("export, streamed")
    assert any("layer-streamed reference" in n for n in names)
    assert all(s["peak_rss_gb"] > 0 and s["seconds"] >= 0 for s in report["stages"])
    assert report["memory"]["peak_rss_bytes"] > 0 and report["memory"]["float32_weights_bytes"] > 0
    assert "## Stages" in (out / "report.md").read_text()
    meta = json.loads((out / "loraexport.json").read_text())
    assert meta["streamed"] is True and meta["mode"] == "merged"
    # the oracle: PEFT's unmerged model generates these 16 tokens from these prompts
    ids = torch.tensor([[5, 17, 3, 44, 9, 71], [0, 0, 8, 30, 12, 60]])
    mask = (torch.arange(6) >= torch.tensor([[0], [2]])).long()
    with torch.no_grad():
        want = peft_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
        )[:, 6:]
    got = OnnxModel(out).generate(ids.numpy(), mask.numpy(), 16)
    assert np.array_equal(got, want.numpy())
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    ("extra", "kept"), [(("--quantize", "int4", "--keep-adapter"), True), (("--quantize", "int8"), False)]
)
def test_streamed_quantized_exports_keep_the_adapter(llama, tmp_path, extra, kept):
    base, adapter, _ = llama
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--stream", *extra))
    q = _report(out)["quantization"][0]
    assert q["adapter"] == ("kept in float32" if kept else "merged")
    # kept: Q - Q0 is the float32 branch itself, up to the base's quantization moving its inputs
    assert q["adapter_retained"] > (0.9 if kept else 0.5), q
    assert not list(tmp_path.glob(".loraexport-base-*"))  # Q0's scratch folder is gone


def test_a_wrong_weight_in_the_export_fails_verification_with_exit_4(llama, tmp_path, monkeypatch):
    """The reference reads the checkpoint and the adapter itself: an export missing one module's
    update fails parity (the check can fail)."""
    from loraexport.export.streamed import CheckpointSource

    base, adapter, _ = llama
    original = CheckpointSource.linear

    def drop_one(self, path):
        lin = original(self, path)
        if path == "model.layers.1.self_attn.v_proj":
            return type(lin)(self.checkpoint.read(f"{path}.weight").float(), lin.bias)
        return lin

    monkeypatch.setattr(CheckpointSource, "linear", drop_one)
    r = run("merge-and-export", "--base", base, "--adapter", adapter, "--out", tmp_path / "out", "--stream")
    refused(r, 4, "parity failed", printed=True)
    assert _report(tmp_path / "out")["passed"] is False


def test_export_streamed_writes_a_runnable_export(llama, tmp_path):
    base, adapter, _ = llama
    out = tmp_path / "out"
    ok(run("export", "--model", base, "--adapter", adapter, "--out", out, "--stream", "--dtype", "bfloat16"))
    meta = json.loads((out / "loraexport.json").read_text())
    assert (
        meta["streamed"]
        and meta["weights_dtype"] == "bfloat16"
        and meta["graphs"]["model"]["logits"] == "last"
    )
    assert (out / "genai_config.json").is_file()
    logits = OnnxModel(out).forward(np.array([[5, 6, 7]]), np.ones((1, 3), np.int64))
    assert logits.shape == (1, 1, 96) and np.isfinite(logits).all()
    ok(run("verify", "--check-files", out))


def test_auto_streams_when_the_model_would_not_fit(llama, tmp_path, monkeypatch):
    import loraexport.stages.residency as residency
    import loraexport.stages.verify as verify

    base, adapter, _ = llama
    monkeypatch.setattr(residency, "available", lambda: 1000)  # bytes: nothing fits
    monkeypatch.setattr(verify, "check_session_fits", lambda *a: None)
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", tmp_path / "a", "--no-latency"))
    assert json.loads((tmp_path / "a" / "loraexport.json").read_text()).get("streamed") is True
    ok(run("export", "--model", base, "--out", tmp_path / "b", "--no-stream"))
    assert "streamed" not in json.loads((tmp_path / "b" / "loraexport.json").read_text())


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (("--mode", "adapter"), ("--mode adapter is not streamed",)),
        (("--dtype", "bfloat16"), ("not verified yet", "--no-verify")),
        (("--quantize", "int8-dynamic"), ("--quantize int8-dynamic is not streamed", "--no-stream")),
    ],
)
def test_what_the_streamed_path_does_not_do_is_refused(llama, tmp_path, extra, needles):
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
            *extra,
        )
        refused(r, 3, *needles)


def test_int8_dynamic_is_never_streamed_not_even_when_the_size_chose_it(llama, tmp_path, monkeypatch):
    """It once wrote a float32 graph described as int8-dynamic (the fused writer has no
    quantize_dynamic): refused before any work, asked for or chosen by the model's size."""
    import loraexport.stages.residency as residency

    base, adapter, _ = llama
    monkeypatch.setattr(residency, "available", lambda: 1000)  # bytes: nothing fits, so auto streams
    for command, where in (("export", "--model"), ("merge-and-export", "--base")):
        with untouched(tmp_path):
            r = run(
                command,
                where,
                base,
                "--adapter",
                adapter,
                "--out",
                tmp_path / "o",
                "--quantize",
                "int8-dynamic",
            )
            refused(r, 3, "--quantize int8-dynamic is not streamed")


def test_stream_refuses_a_family_it_cannot_write(tmp_path):
    make_hf_decoder(tmp_path / "gpt2", "gpt2")
    with untouched(tmp_path):
        refused(
            run("export", "--model", tmp_path / "gpt2", "--out", tmp_path / "o", "--stream"),
            3,
            "--stream writes",
        )


def test_verify_says_what_memory_it_would_need(llama, tmp_path, monkeypatch):
    """An export that is not the fused graph runs in one onnxruntime session: where that would
    not fit, verify says what it needs instead of running out of memory."""
    import loraexport.stages.residency as residency

    base, adapter, _ = llama
    ok(run("export", "--model", base, "--adapter", adapter, "--out", tmp_path / "plain", "--no-stream"))
    monkeypatch.setattr(residency, "available", lambda: 10**5)
    with untouched(tmp_path):
        r = run("verify", "--base", base, "--adapter", adapter, "--onnx", tmp_path / "plain", "--stream")
        refused(r, 3, "verifying this export needs about", "GB is available", "--no-verify")


@pytest.mark.parametrize("streamed_export", [True, False], ids=["streamed-export", "optimize-export"])
def test_verify_stream_checks_an_export_against_the_layer_streamed_reference(
    llama, tmp_path, streamed_export
):
    """``verify --stream``: any causal export of a fused-family base (here also one written from a
    model in memory) against the reference computed layer by layer. Unasked, a streamed export of
    a model this small is verified in memory, as merge-and-export verifies it (a larger one would
    be layered: ``residency.verifies_in_memory``)."""
    base, adapter, _ = llama
    out = tmp_path / "out"
    how = ("--stream",) if streamed_export else ("--no-stream", "--optimize")
    ok(run("export", "--model", base, "--adapter", adapter, "--out", out, *how))
    asked = ("--stream",)
    if streamed_export:
        r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, "--json", "--no-latency"))
        unasked = json.loads(r.stdout)
        assert unasked["passed"] is True and not unasked.get("stages") and unasked["parity"]
    r = ok(run("verify", "--base", base, "--adapter", adapter, "--onnx", out, "--json", *asked))
    report = json.loads(r.stdout)
    assert report["passed"] is True and report["stages"] and "layer by layer" in report["notes"][0]
    r = run(
        "verify", "--base", base, "--adapter", adapter, "--onnx", out, "--json", "--weight", "0.5", *asked
    )
    refused(r, 4, "weights differ", printed=True)  # another model: the proof notices


@pytest.mark.slow
def test_merge_and_export_streamed_stays_under_the_weights_in_memory(tmp_path):
    """Scaled down, what make bench-7b measures: the whole run (export, onnxruntime a few layers at
    a time, the layer-streamed reference in float32 and float64) stays under 1.0x the float32
    weights above the interpreter's own baseline, in a real process. The in-memory path needs
    2.4x (make bench-large)."""
    from clihelp import peak_rss_mb

    from loraexport.export.streamed import Checkpoint

    model = make_hf_decoder(tmp_path / "base", "llama", **MEMORY_MODEL)  # ~205 MB of float32
    make_peft_adapter(model, tmp_path / "adapter", "llama")
    weights_mb = 4 * Checkpoint(tmp_path / "base").numel / 2**20
    args = ("merge-and-export", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter")
    r, peak_mb = peak_rss_mb(*args, "--out", tmp_path / "out", "--stream", timeout=600)
    ok(r)
    report = _report(tmp_path / "out")
    assert report["passed"] is True
    # the baseline: the process after its imports and the inputs' headers, before any weight is read
    baseline_mb = report["stages"][0]["rss_after_gb"] * 1e9 / 2**20
    assert 100 < baseline_mb < peak_mb
    print(
        f"streamed merge-and-export: {(peak_mb - baseline_mb) / weights_mb:.2f}x the weights above baseline"
    )
    assert peak_mb - baseline_mb < 1.0 * weights_mb, (peak_mb, baseline_mb, weights_mb)


def test_the_default_writes_from_the_checkpoint_and_verifies_a_small_model_in_memory(llama, tmp_path):
    """No flag: the bounded export (written from the checkpoint), and for a model this small the
    fuller in-memory checks (parity cases of several shapes, latency); --stream keeps the
    layer-streamed reference."""
    base, adapter, _ = llama
    ok(
        run(
            "merge-and-export",
            "--base",
            base,
            "--adapter",
            adapter,
            "--out",
            tmp_path / "d",
            "--samples",
            "3",
        )
    )
    meta = json.loads((tmp_path / "d" / "loraexport.json").read_text())
    report = _report(tmp_path / "d")
    assert meta["streamed"] is True and report["passed"] is True
    assert any("the model in memory" in n for n in report["notes"])
    assert len(report["parity"]["cases"]) == 3 and report["latency"]
    assert [s["name"] for s in report["stages"]][-1] == "verify, the model in memory"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", tmp_path / "s", "--stream"))
    assert any("layer by layer" in n for n in _report(tmp_path / "s")["notes"])


@pytest.mark.slow
def test_a_run_killed_while_it_verifies_leaves_nothing_after_the_next(tmp_path):
    """``kill -9`` of ``merge-and-export --stream`` while its verification runs the export a few
    layers at a time leaves its scratch folder (``.loraexport-chunks-*``, hard links to the
    weights) beside the output; the next run to the same output removes it, and nothing
    ``.loraexport-*`` remains (issue 26)."""
    import signal
    import subprocess
    import time

    from clihelp import COMMAND

    make_peft_adapter(
        make_hf_decoder(tmp_path / "base", "llama", **MEMORY_MODEL), tmp_path / "adapter", "llama"
    )
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    pair = ["--base", tmp_path / "base", "--adapter", tmp_path / "adapter"]
    args = [
        *COMMAND,
        "--quiet",
        "merge-and-export",
        *pair,
        "--out",
        out,
        "--stream",
        "--no-latency",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(work.glob(".loraexport-chunks-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its verification made a scratch folder"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob(".loraexport-*")), "the killed run left nothing: the test did not test"
    r = subprocess.run([str(a) for a in [*args, "--force"]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not list(work.glob(".loraexport-*")) and not list(work.glob(".out.*"))
    assert (out / "report.json").is_file()


def test_streamed_int8_of_a_tied_decoder_gathers_the_heads_codes_and_passes(tmp_path):
    """Qwen2 ties its embedding to the LM head: the streamed int8 graph gathers the head's codes,
    the layer-streamed reference reads the same dequantized rows (parity passes), and the proof
    holds both modules by one tensor."""
    import onnx
    from hf_tiny import save_base_and_adapter

    base, adapter = save_base_and_adapter("qwen2", tmp_path / "in")
    out = tmp_path / "out"
    ok(run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--stream",
           "--quantize", "int8", "--no-latency"))  # fmt: skip
    report = _report(out)
    assert report["passed"] and report["parity"]["top1_agreement"] == 1.0
    assert report["proof"]["modules"] == 2 * 7 + 2
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    (gather,) = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    assert gather.input[0] == "lm_head.weight.T_Q8"
