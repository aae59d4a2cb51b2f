"""DoRA through the real CLI: what is refused (one line, exit 3, nothing written), what works
beside the default merge (``--mode unmerged``, int8), and ``analyze``'s magnitude figures."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from artifacts import make_hf_decoder
from clihelp import nothing_left, ok, refused, run

from loraexport.analyze.analysis import analyze

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """A tiny Llama, a DoRA adapter on q_proj/v_proj (random B, magnitude moved), a plain one."""
    root = tmp_path_factory.mktemp("dora-cli")
    base = make_hf_decoder(root / "base", "llama")
    for name, use_dora in (("dora", True), ("plain", False)):
        model = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora),
        )
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "extra", "needles"),
    [
        ("merge-and-export", ["--mode", "adapter"], ("DoRA adapter", "--mode adapter")),
        ("export", ["--mode", "adapter"], ("DoRA adapter", "--mode adapter")),
        ("merge-and-export", ["--quantize", "int8", "--keep-adapter"], ("DoRA adapter", "--keep-adapter")),
        ("export", ["--mode", "unmerged", "--optimize"], ("DoRA adapter", "--optimize")),
        ("export", ["--mode", "unmerged", "--stream"], ("DoRA adapter", "streamed unmerged")),
        ("merge-and-export", ["--weight", "0.5"], ("DoRA adapter", "weight 1 only")),
        ("merge", ["--weight", "0.5"], ("DoRA adapter", "weight 1 only")),
    ],
    ids=["mae-adapter-mode", "export-adapter-mode", "keep-adapter", "unmerged-fused", "unmerged-stream",
         "mae-weight", "merge-weight"],
)  # fmt: skip
def test_refused_where_the_graph_would_keep_bare_branches(dora, tmp_path, command, extra, needles):
    src = "--model" if command == "export" else "--base"
    out = tmp_path / "out"
    r = run(command, src, dora / "base", "--adapter", dora / "dora", "--out", out, *extra)
    refused(r, 3, *needles)
    nothing_left(out)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "merge-and-export"])
def test_refused_beside_another_adapter(dora, tmp_path, command):
    args = ["--adapter", dora / "plain", "--adapter", dora / "dora", "--out", tmp_path / "out"]
    refused(run(command, "--base", dora / "base", *args), 3, "DoRA adapter", "merged alone")
    nothing_left(tmp_path / "out")


@pytest.mark.slow
def test_unmerged_export_and_int8_merge_verify(dora, tmp_path):
    ok(run("export", "--model", dora / "base", "--adapter", dora / "dora", "--out", tmp_path / "u",
           "--mode", "unmerged"))  # fmt: skip
    ok(run("verify", "--base", dora / "base", "--adapter", dora / "dora", "--onnx", tmp_path / "u",
           "--no-latency"))  # fmt: skip
    ok(run("merge-and-export", "--base", dora / "base", "--adapter", dora / "dora", "--out", tmp_path / "q",
           "--quantize", "int8", "--no-latency"))  # fmt: skip
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["passed"] and report["adapters"][0]["use_dora"] is True


@pytest.mark.slow
def test_verify_catches_a_dora_export_merged_without_its_magnitude(dora, tmp_path):
    """The check can fail: the plain adapter (same A, B, no m) exported, verified as the DoRA one."""
    ok(run("merge-and-export", "--base", dora / "base", "--adapter", dora / "plain", "--out", tmp_path / "p",
           "--no-verify"))  # fmt: skip
    r = run("verify", "--base", dora / "base", "--adapter", dora / "dora", "--onnx", tmp_path / "p",
            "--no-latency")  # fmt: skip
    assert r.exit_code == 4, r.output


@pytest.mark.slow
def test_analyze_reports_the_magnitude_beside_the_spectrum(dora, tmp_path):
    data = analyze(dora / "base", dora / "dora", tmp_path / "a", plots=False, show_progress=False)
    assert data["adapter"]["use_dora"] is True and "magnitude" in data["settings"]
    from loraexport.lora.adapter import Adapter

    adapter = Adapter.load(dora / "dora")
    _, model = __import__("loraexport.models.registry", fromlist=["load_base"]).load_base(dora / "base")
    for m in data["modules"]:
        w0 = model.get_submodule(m["module"]).weight.detach().double()
        m0 = torch.linalg.vector_norm(w0, dim=1)
        mag = adapter.magnitudes[m["module"]].double()
        want = float(torch.linalg.vector_norm(mag - m0) / torch.linalg.vector_norm(m0))
        assert m["dora"]["magnitude_change"] == pytest.approx(want, rel=1e-12)
        assert m["dora"]["magnitude_max_change"] == pytest.approx(
            float((mag / m0 - 1).abs().max()), rel=1e-12
        )
        assert 0.05 < m["dora"]["magnitude_change"] < 0.5  # moved ~20% per row by the fixture
    assert all("magnitude_change_mean" in t for t in data["types"])
    md = (tmp_path / "a" / "analysis.md").read_text()
    assert "DoRA" in md and "Δm/m₀" in md
    plain = analyze(dora / "base", dora / "plain", show_progress=False)
    assert all("dora" not in m for m in plain["modules"]) and "magnitude" not in plain["settings"]
