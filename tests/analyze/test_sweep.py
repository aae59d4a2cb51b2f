"""``sweep``: the plan (equal budgets), and a few-step run on the tiny base through API and CLI."""

from __future__ import annotations

import json

from clihelp import ok, run

from loraexport.analyze.sweep import RANK_TARGETS, TARGET_SETS, SweepConfig, plan, sweep
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import linear_shape, target_names
from loraexport.models.reference import load_model

FAST = dict(steps=2, seeds=1, batch_size=8, show_progress=False)


def test_plan_is_the_papers_tables_at_one_budget():
    tables = plan()
    assert [(c.targets, c.rank) for c in tables["targets"]] == [
        (("q",), 8),
        (("k",), 8),
        (("v",), 8),
        (("o",), 8),
        (("q", "v"), 4),
        (("q", "k", "v", "o"), 2),
    ]
    assert [c.rank for c in tables["ranks"]] == [1, 2, 4, 8, 64]
    assert {c.targets for c in tables["ranks"]} == {RANK_TARGETS}
    distinct = set(tables["targets"]) | set(tables["ranks"])
    assert len(distinct) == 10  # {q,v} r=4 is in both tables, trained once
    assert SweepConfig(("q", "k", "v", "o"), 2).name == "qkvo-r2"


def test_target_sets_have_equal_trainable_parameters_on_the_sample_base(sample_base):
    model = load_model(sample_base)
    modules = dict(model.named_modules())

    def parameters(config: SweepConfig) -> int:
        cfg = LoraConfig(r=config.rank, lora_alpha=16, target_modules=list(config.targets))
        return sum(config.rank * sum(linear_shape(modules[p])) for p in target_names(model, cfg))

    counts = {c.name: parameters(c) for c in plan()["targets"]}
    assert len(set(counts.values())) == 1, counts
    assert len(TARGET_SETS) == len(counts)


def test_sweep_trains_tabulates_and_keeps_adapters(tmp_path, seq2seq_base, small_data):
    out = tmp_path / "sweep"
    result = sweep(seq2seq_base, small_data, out, ranks=[1], target_sets=[("q",)], budget_rank=2, **FAST)
    assert [c["config"] for c in result["configs"]] == ["q-r2", "qv-r1"]
    assert result["tables"] == {"targets": ["q-r2"], "ranks": ["qv-r1"]}
    # one self-attention q per layer (1 encoder, 2 decoder) plus 2 cross-attention q: 5 × 2 × (16 + 16)
    assert [c["trainable_parameters"] for c in result["configs"]] == [320, 320]
    for one in result["runs"]:
        assert (out / one["adapter"] / "adapter_model.safetensors").is_file()
        assert 0 <= one["eval_exact_match"] <= 1 and one["eval_loss"] > 0
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "eval.jsonl").is_file()
    assert json.loads((out / "sweep.json").read_text())["configs"] == result["configs"]
    md = (out / "sweep.md").read_text()
    assert "the paper's table 5" in md and "the paper's table 6" in md
    assert "| {q} | 2 | 320 |" in md


def test_sweep_cli_runs_both_full_tables(tmp_path, seq2seq_base, small_data):
    out = tmp_path / "sweep"
    held = tmp_path / "held.jsonl"  # a file of its own: --eval-data is never the --data file
    held.write_bytes(small_data.read_bytes())
    result = ok(
        run(
            "sweep",
            "--base",
            seq2seq_base,
            "--data",
            small_data,
            "--eval-data",
            held,
            "--out",
            out,
            "--steps",
            "1",
            "--seeds",
            "1",
            "--ranks",
            "1,2",
            "--json",
        )
    )
    data = json.loads(result.stdout)
    assert len(data["tables"]["targets"]) == 6 and data["tables"]["ranks"] == ["qv-r1", "qv-r2"]
    budgets = {c["trainable_parameters"] for c in data["configs"] if c["config"] in data["tables"]["targets"]}
    assert len(budgets) == 1
    assert not (out / "data").exists()  # --eval-data given: no split of its own
