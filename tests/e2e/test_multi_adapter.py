"""Several adapters with weights, end to end: merge-and-export, then verify, through the CLI."""

from __future__ import annotations

import json

import pytest
from artifacts import make_adapter
from clihelp import QUICK, ok, refused, run

pytestmark = pytest.mark.slow  # an export and three verifications


def test_two_weighted_adapters_export_and_verify(causal_base, causal_adapter, tmp_path):
    other = make_adapter(
        causal_base, tmp_path / "other", seed=7, r=2, lora_alpha=4, target_modules=["q", "o"]
    )
    out = tmp_path / "out"
    pair = ("--adapter", causal_adapter, "--adapter", other)
    ok(
        run(
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
            *QUICK,
        )
    )
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] is True
    assert [a["weight"] for a in report["adapters"]] == [0.7, 0.3]
    provenance = json.loads((out / "loraexport.json").read_text())["inputs"]["adapters"]
    assert [a["weight"] for a in provenance] == [0.7, 0.3]  # the export can be reproduced
    merged = tmp_path / "merged"
    ok(run("merge", "--base", causal_base, *pair, "--weight", "0.7", "--weight", "0.3", "--out", merged))
    assert [a["weight"] for a in json.loads((merged / "merge.json").read_text())["adapters"]] == [0.7, 0.3]
    r = run(
        "merge", "--base", causal_base, *pair, "--weight", "nan", "--weight", "1", "--out", tmp_path / "m2"
    )
    refused(r, 2, "'--weight': nan is not a finite number")  # the option's type
    assert report["parity"]["generation"]["identical_rows"] == report["parity"]["generation"]["rows"]
    # the same export against other weights: the unmerged reference differs, parity must fail
    r = run(
        "verify", "--base", causal_base, *pair, "--weight", "0.7", "--weight", "0.4", "--onnx", out, *QUICK
    )
    refused(r, 4, "weights differ", printed=True)  # the proof: another merge
    # one weight for two adapters is a usage error (exit 2), named
    r = run("verify", "--base", causal_base, *pair, "--weight", "0.7", "--onnx", out, *QUICK)
    refused(r, 2, "2 --adapter but 1 --weight")
