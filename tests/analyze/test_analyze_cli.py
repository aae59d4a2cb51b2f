"""``loraexport analyze`` end to end through the CLI: files, fields, figures against direct math."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from artifacts import make_adapter
from clihelp import ok, refused, run

from loraexport.analyze.analysis import analyze, split_path
from loraexport.errors import InvalidInputError
from loraexport.lora.adapter import Adapter
from loraexport.models.reference import load_model

RTOL = 1e-6  # the contract for every figure (float64 on both sides)
MODULE_FIELDS = {
    "module",
    "rank",
    "scaling",
    "delta_fro",
    "w_fro",
    "singular_values",
    "effective_rank",
    "proj_delta",
    "proj_top",
    "proj_random",
    "amplification",
}
PLOTS = {"spectra.png", "projections.png"}
MANIFEST = "loraexport.json"  # every atomic output may carry the sha256 of its files


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} - {MANIFEST}


def _direct(w: np.ndarray, a: np.ndarray, b: np.ndarray, s: float) -> dict[str, object]:
    """The figures from the formed ΔW and numpy's SVD."""
    delta = s * b @ a  # (out, in)
    k = min(a.shape[0], *w.shape)
    u, sv, vt = np.linalg.svd(delta)
    w_sv = np.linalg.svd(w, compute_uv=False)
    proj = np.linalg.norm(u[:, :k].T @ w @ vt[:k].T)
    return {
        "delta_fro": np.linalg.norm(delta),
        "w_fro": np.linalg.norm(w),
        "singular_values": sv[:k],
        "proj_delta": proj,
        "proj_top": np.sqrt(np.sum(w_sv[:k] ** 2)),
        "amplification": np.linalg.norm(delta) / proj,
    }


def _check_against_direct(modules: list[dict], weights: dict[str, np.ndarray], adapter: Adapter) -> None:
    for m in modules:
        a, b = (t.double().numpy() for t in adapter.weights[m["module"]])
        expected = _direct(weights[m["module"]], a, b, adapter.config.scaling(m["module"]))
        for key, value in expected.items():
            np.testing.assert_allclose(m[key], value, rtol=RTOL, err_msg=f"{m['module']} {key}")


def test_analyze_writes_json_markdown_plots_with_exact_figures(tmp_path, seq2seq_base, seq2seq_adapter):
    out = tmp_path / "analysis"
    result = ok(run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out))
    assert "analysis written to" in result.stdout
    assert _files(out) == {"analysis.json", "analysis.md"} | PLOTS
    data = json.loads((out / "analysis.json").read_text())
    adapter = Adapter.load(seq2seq_adapter)
    assert [m["module"] for m in data["modules"]] == [
        n for n, _ in load_model(seq2seq_base).named_modules() if n in adapter.weights
    ]  # every adapted module, in the model's order
    for m in data["modules"]:
        assert MODULE_FIELDS <= set(m)
        assert m["rank"] == 4 and m["scaling"] == 2.0
    model = load_model(seq2seq_base)
    weights = {p: model.get_submodule(p).weight.detach().double().numpy() for p in adapter.weights}
    _check_against_direct(data["modules"], weights, adapter)
    types = {t["type"]: t for t in data["types"]}
    assert set(types) == {"self_attn.q", "self_attn.v", "cross_attn.q", "cross_attn.v"}
    assert sum(t["modules"] for t in data["types"]) == sum(r["modules"] for r in data["layers"]) == 10
    q = [m for m in data["modules"] if m["type"] == "self_attn.q"]
    assert types["self_attn.q"]["delta_fro"] == pytest.approx(np.sqrt(sum(m["delta_fro"] ** 2 for m in q)))
    assert data["plots"] == sorted(PLOTS, reverse=True) and data["compare"] is None
    md = (out / "analysis.md").read_text()
    for heading in ("## Per projection type", "## Per layer", "## Per module", "![spectra.png]"):
        assert heading in md
    assert "`decoder.1.cross_attn.v`" in md


def test_json_flag_prints_analysis_json_and_force_replaces(tmp_path, seq2seq_base, seq2seq_adapter):
    out = tmp_path / "analysis"
    args = ["--base", str(seq2seq_base), "--adapter", str(seq2seq_adapter), "--out", str(out), "--no-plots"]
    printed = json.loads(ok(run("analyze", *args, "--json")).stdout)
    assert printed == json.loads((out / "analysis.json").read_text())
    assert printed["plots"] == [] and printed["plots_note"] == "plots not requested"
    refused(run("analyze", *args, quiet=False), 3, "output exists")
    (out / "marker").write_text("old")
    ok(run("analyze", *args, "--force"))
    assert not (out / "marker").exists()


def test_compare_gives_phi_grids(tmp_path, seq2seq_base, seq2seq_adapter):
    other = make_adapter(seq2seq_base, tmp_path / "r2", seed=5, r=2, lora_alpha=4)
    out = tmp_path / "analysis"
    ok(run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--compare", other, "--out", out))
    data = json.loads((out / "analysis.json").read_text())
    assert "similarity.png" in data["plots"] and (out / "similarity.png").is_file()
    entries = data["compare"]["modules"]
    assert len(entries) == 10
    for e in entries:
        assert (e["rank_1"], e["rank_2"]) == (4, 2) and np.array(e["phi"]).shape == (4, 2)
        assert 0 <= min(min(row) for row in e["phi"]) and max(max(row) for row in e["phi"]) <= 1 + 1e-12
        assert e["phi_random_full"] == pytest.approx(4 / 16)
    assert "## Subspace similarity" in (out / "analysis.md").read_text()

    same = analyze(seq2seq_base, seq2seq_adapter, compare=seq2seq_adapter, show_progress=False)
    for e in same["compare"]["modules"]:
        np.testing.assert_allclose(e["phi"], np.ones((4, 4)), atol=1e-12)


def test_without_matplotlib_writes_json_and_markdown_with_a_note(
    tmp_path, seq2seq_base, seq2seq_adapter, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "analysis"
    result = ok(
        run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out, quiet=False)
    )
    assert _files(out) == {"analysis.json", "analysis.md"}
    data = json.loads((out / "analysis.json").read_text())
    assert data["plots"] == [] and "matplotlib is not installed" in data["plots_note"]
    assert "matplotlib is not installed" in (out / "analysis.md").read_text()
    assert "note: matplotlib is not installed" in result.stderr


def test_gpt2_conv1d_weights_are_taken_as_out_by_in(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from loraexport.lora.config import LoraConfig

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)
    )
    model.save_pretrained(tmp_path / "gpt2")
    g = torch.Generator().manual_seed(1)
    weights = {
        f"transformer.h.{i}.attn.c_attn": (torch.randn(3, 16, generator=g), torch.randn(48, 3, generator=g))
        for i in range(2)
    }
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True)
    (tmp_path / "adapter").mkdir()
    Adapter(config, weights).save(tmp_path / "adapter")

    data = analyze(tmp_path / "gpt2", tmp_path / "adapter", show_progress=False)
    assert [m["shape"] for m in data["modules"]] == [[48, 16], [48, 16]]  # (out, in), not Conv1D's (in, out)
    conv = {p: model.get_submodule(p).weight.detach().double().numpy().T for p in weights}
    _check_against_direct(data["modules"], conv, Adapter.load(tmp_path / "adapter"))
    assert [t["type"] for t in data["types"]] == ["attn.c_attn"]


@pytest.mark.parametrize(
    "path,expected",
    [
        ("decoder.1.cross_attn.q", ("decoder.1", "cross_attn.q")),
        ("transformer.h.11.attn.c_attn", ("transformer.h.11", "attn.c_attn")),
        ("model.layers.3.mlp.down_proj", ("model.layers.3", "mlp.down_proj")),
        ("lm_head", ("-", "lm_head")),
    ],
)
def test_split_path(path: str, expected: tuple[str, str]):
    assert split_path(path) == expected


def test_no_temporary_folder_is_left(tmp_path: Path, seq2seq_base, seq2seq_adapter):
    out = tmp_path / "analysis"
    ok(run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out, "--no-plots"))
    assert [p.name for p in tmp_path.iterdir()] == ["analysis"]


def test_replaced_parameters_are_named_as_not_analysed(tmp_path, seq2seq_base, seq2seq_adapter):
    import torch

    adapter = Adapter.load(seq2seq_adapter)
    adapter.config.bias = "all"
    adapter.replacements = {"decoder.0.ff.fc1.bias": torch.zeros(32)}
    (tmp_path / "with-bias").mkdir()
    adapter.save(tmp_path / "with-bias")
    data = analyze(seq2seq_base, tmp_path / "with-bias", tmp_path / "out", plots=False, show_progress=False)
    assert data["adapter"]["replaced_parameters"] == ["decoder.0.ff.fc1.bias"]
    assert (
        "not analysed: 1 parameter(s) the adapter replaces" in (tmp_path / "out" / "analysis.md").read_text()
    )


def _with_zero_b(src: Path, dst: Path, modules: list[str] | None = None) -> Path:
    """A copy of the adapter ``src`` with B = 0 (as right after initialisation) in ``modules`` (all: None)."""
    import torch

    adapter = Adapter.load(src)
    for path in modules if modules is not None else list(adapter.weights):
        a, b = adapter.weights[path]
        adapter.weights[path] = (a, torch.zeros_like(b))
    dst.mkdir()
    adapter.save(dst)
    return dst


def test_a_zero_module_has_null_projections_and_summaries_skip_it(tmp_path, seq2seq_base, seq2seq_adapter):
    zero = "decoder.0.self_attn.q"
    adapter = _with_zero_b(seq2seq_adapter, tmp_path / "one-zero", [zero])
    out = tmp_path / "analysis"
    ok(run("analyze", "--base", seq2seq_base, "--adapter", adapter, "--out", out))  # plots included
    data = json.loads((out / "analysis.json").read_text())
    assert "rank_tolerance" in data["settings"]
    by_module = {m["module"]: m for m in data["modules"]}
    assert by_module[zero]["rank_used"] == 0 and by_module[zero]["delta_fro"] == 0.0
    for key in ("proj_delta", "proj_top", "proj_random", "amplification"):
        assert by_module[zero][key] is None, key
    others = [m for m in data["modules"] if m["module"] != zero]
    assert all(m["rank_used"] == 4 for m in others)
    q = {t["type"]: t for t in data["types"]}["self_attn.q"]
    rest = [m for m in others if m["type"] == "self_attn.q"]
    assert q["modules"] == len(rest) + 1
    for key in ("proj_delta", "proj_top", "proj_random", "amplification"):
        assert q[f"{key}_mean"] == pytest.approx(np.mean([m[key] for m in rest])), key
    row = next(line for line in (out / "analysis.md").read_text().splitlines() if f"`{zero}`" in line)
    assert row.rstrip(" |").endswith("| – | – | – | –")


def test_a_freshly_initialised_adapter_reports_no_projections(tmp_path, seq2seq_base, seq2seq_adapter):
    adapter = _with_zero_b(seq2seq_adapter, tmp_path / "all-zero")
    out = tmp_path / "analysis"
    result = ok(run("analyze", "--base", seq2seq_base, "--adapter", adapter, "--out", out))
    data = json.loads((out / "analysis.json").read_text())
    assert {m["rank_used"] for m in data["modules"]} == {0}
    for t in data["types"] + data["layers"]:
        assert t["delta_fro"] == 0.0 and t["amplification_mean"] is None and t["proj_delta_mean"] is None
    lines = result.stdout.splitlines()
    assert lines[0].startswith("type") and len(lines) == 1 + len(data["types"]) + 1
    for line in lines[1:-1]:
        assert line.split()[-2:] == ["–", "–"]  # amplification, ΔW/random
    assert data["plots"] == sorted(PLOTS, reverse=True)


def test_seed_out_of_range_is_a_usage_error(tmp_path, seq2seq_base, seq2seq_adapter):
    from loraexport.analyze import analysis
    from loraexport.cli import types as cli

    out = tmp_path / "analysis"
    for seed in (str(2**64), str(2**63), "-1"):
        r = run("analyze", "--base", seq2seq_base, "--adapter", seq2seq_adapter, "--out", out, "--seed", seed)
        refused(r, 2, "'--seed'", "is not in [0, 9,223,372,036,854,775,807]")
        assert not out.exists()
    assert cli.MAX_SEED == analysis.MAX_SEED == 2**63 - 1
    largest = str(2**63 - 1)
    ok(
        run(
            "analyze",
            "--base",
            seq2seq_base,
            "--adapter",
            seq2seq_adapter,
            "--out",
            out,
            "--no-plots",
            "--seed",
            largest,
        )
    )
    assert json.loads((out / "analysis.json").read_text())["settings"]["seed"] == 2**63 - 1
    with pytest.raises(
        InvalidInputError, match=r"seed must be in \[0, 2\*\*63 - 1\], got 18446744073709551616"
    ):
        analyze(seq2seq_base, seq2seq_adapter, seed=2**64, show_progress=False)  # the library checks too
