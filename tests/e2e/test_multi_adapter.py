"""Several adapters with weights, end to end: merge-and-export, then verify, through the CLI."""

from __future__ import annotations

import json

from artifacts import make_adapter
from click.testing import CliRunner

from loraexport.cli import main


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_two_weighted_adapters_export_and_verify(causal_base, causal_adapter, tmp_path):
    other = make_adapter(
        causal_base, tmp_path / "other", seed=7, r=2, lora_alpha=4, target_modules=["q", "o"]
    )
    out = tmp_path / "out"
    pair = ("--adapter", causal_adapter, "--adapter", other)
    common = ("--no-latency", "--samples", "2")
    r = _run(
        "merge-and-export",
        "--base",
        causal_base,
        *pair,
        "--weight",
        "0.7",
        "--weight",
        "0.3",
        "--out",
        out,
        *common,
    )
    assert r.exit_code == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] is True
    assert [a["weight"] for a in report["adapters"]] == [0.7, 0.3]
    provenance = json.loads((out / "loraexport.json").read_text())["inputs"]["adapters"]
    assert [a["weight"] for a in provenance] == [0.7, 0.3]  # the export can be reproduced
    merged = tmp_path / "merged"
    r = _run("merge", "--base", causal_base, *pair, "--weight", "0.7", "--weight", "0.3", "--out", merged)
    assert r.exit_code == 0, r.stderr
    assert [a["weight"] for a in json.loads((merged / "merge.json").read_text())["adapters"]] == [0.7, 0.3]
    r = _run(
        "merge", "--base", causal_base, *pair, "--weight", "nan", "--weight", "1", "--out", tmp_path / "m2"
    )
    assert r.exit_code == 2 and "'--weight': nan is not a finite number" in r.stderr  # the option's type
    assert report["parity"]["generation"]["identical_rows"] == report["parity"]["generation"]["rows"]
    # the same export against other weights: the unmerged reference differs, parity must fail
    r = _run(
        "verify", "--base", causal_base, *pair, "--weight", "0.7", "--weight", "0.4", "--onnx", out, *common
    )
    assert r.exit_code == 4 and "parity failed" in r.stderr
    # one weight for two adapters is a usage error (exit 2), named
    r = _run("verify", "--base", causal_base, *pair, "--weight", "0.7", "--onnx", out, *common)
    assert r.exit_code == 2 and "2 --adapter but 1 --weight" in r.stderr
