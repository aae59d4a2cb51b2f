"""``--junit FILE``: the checks as JUnit XML, the format CI systems read. It parses (a parser reads
it back), each check is a test case, and a planted wrong export is exit 4 with a ``<failure>`` in
the gate that caught it. The file follows the output rules: never into an input, checked before
any work (issue 26)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from artifacts import make_hf_decoder, make_peft_adapter
from clihelp import ok, refused, run
from tamper import edit_initializers, names, restamp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("junit")
    model = make_hf_decoder(tmp / "base", "llama")
    make_peft_adapter(model, tmp / "adapter", "llama")
    ok(run("export", "--model", tmp / "base", "--adapter", tmp / "adapter", "--out", tmp / "onnx"))
    return tmp


def _suite(path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert int(suite.get("tests")) == len(suite.findall("testcase"))
    return suite


def _verify(llama, onnx, junit, *extra):
    pair = ("--base", llama / "base", "--adapter", llama / "adapter")
    return run("verify", *pair, "--onnx", onnx, "--junit", junit, "--samples", "2", *extra)


def test_an_honest_export_is_a_passing_suite(llama, tmp_path):
    junit = tmp_path / "verify.xml"
    ok(_verify(llama, llama / "onnx", junit))
    suite = _suite(junit)
    classes = {c.get("classname") for c in suite.findall("testcase")}
    assert {"files", "parity.cpu", "latency.cpu"} <= classes, classes
    assert suite.get("failures") == "0" and not suite.findall(".//failure")


def _planted(onnx, *pattern: str):
    def scale(arrays):
        name = names(arrays, *pattern)[0]
        arrays[name] = (arrays[name] * np.float32(1.5)).astype(arrays[name].dtype)

    edit_initializers(onnx / "model.onnx", scale)
    restamp(onnx)  # loraexport.json rewritten to match: the manifest cannot tell
    return onnx


def _failed(junit) -> list:
    return [c for c in _suite(junit).findall("testcase") if c.find("failure") is not None]


def test_a_planted_wrong_weight_is_a_failure_in_the_proof_gate(llama, tmp_path):
    import shutil

    onnx = _planted(shutil.copytree(llama / "onnx", tmp_path / "onnx"), r"layers\.0\.", "o_proj")
    junit = tmp_path / "verify.xml"
    r = _verify(llama, onnx, junit, "--no-latency")
    assert r.exit_code == 4, r.output
    failed = _failed(junit)
    assert [c.get("classname") for c in failed] == ["weights"], [c.get("name") for c in failed]
    assert "o_proj" in failed[0].find("failure").get("message")


def test_a_planted_wrong_weight_in_a_float16_file_is_a_failure_in_the_proof_gate_too(llama, tmp_path):
    """float16 files are proven as float32 ones are (their parity-gate failure, which every file
    now meets only after the proof passed, is rendered in tests/test_report.py)."""
    onnx = tmp_path / "onnx"
    pair = ("--model", llama / "base", "--adapter", llama / "adapter")
    ok(run("export", *pair, "--out", onnx, "--dtype", "float16", "--no-stream"))
    junit = tmp_path / "verify.xml"
    r = _verify(llama, _planted(onnx, "MatMul"), junit, "--no-latency")  # torch.onnx's names
    assert r.exit_code == 4, r.output
    failed = _failed(junit)
    assert [c.get("classname") for c in failed] == ["weights"], [c.get("name") for c in failed]


def test_merge_and_export_writes_it_too(llama, tmp_path):
    junit = tmp_path / "mae.xml"
    pair = ("--base", llama / "base", "--adapter", llama / "adapter")
    ok(
        run(
            "merge-and-export",
            *pair,
            "--out",
            tmp_path / "out",
            "--junit",
            junit,
            "--no-latency",
            "--samples",
            "2",
        )
    )
    assert _suite(junit).get("failures") == "0"


def test_junit_inside_an_input_is_refused_before_work(llama):
    r = _verify(llama, llama / "onnx", llama / "onnx" / "verify.xml")
    refused(r, 2, "--junit", "sits inside the --onnx")
    assert not (llama / "onnx" / "verify.xml").exists()


@pytest.mark.parametrize("junit", ["r.json", "r.md"])
def test_junit_on_the_reports_own_files_is_refused_before_work(llama, tmp_path, junit):
    """--junit and --report (its .json, or the .md written beside it) are two outputs of one run:
    refused before any work, nothing written (it ran whole, then blamed another program)."""
    report = tmp_path / "r.json"
    r = _verify(llama, llama / "onnx", tmp_path / junit, "--report", report)
    refused(r, 2, "--junit", "two outputs of one run")
    assert not list(tmp_path.iterdir())
