"""A report as JUnit XML, the format every CI system reads (``--junit FILE``): one test case per
check — the manifest, the weight-level proof, each parity case's outputs and the generation per
provider, each quality figure, each latency point — and a failed gate as a ``<failure>`` whose
message is the gate's own (``verify.gates``). Figures that only inform (latency, an ungated
quality figure) pass, with their numbers in ``<system-out>``; warnings go to ``<system-err>``."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from loraexport.report.contents import Report
from loraexport.verify.gates import manifest_failures
from loraexport.verify.parity import ParityResult


def _case(suite: ET.Element, classname: str, name: str, failures: list[str], out: str | None = None) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name)
    if failures:
        failure = ET.SubElement(case, "failure", message=failures[0][:1000], type="loraexport.gate")
        failure.text = "\n".join(failures)
    if out:
        ET.SubElement(case, "system-out").text = out


def _parity(suite: ET.Element, p: ParityResult) -> None:
    where = f"parity.{p.provider}"
    for c in p.cases:
        for o in c.outputs:
            why = [f for f in p.failures if f.startswith(f"{c.name}/{o.output}:")]
            figures = f"max abs error {o.max_abs_err:.3g}, tolerance {o.tolerance:.3g}"
            _case(suite, where, f"{c.name}: {o.output}", why if not o.passed else [], figures)
    g = p.generation
    if g is not None:
        failed = [f"generation: {g.first_mismatch}"] if not g.passed else []
        _case(suite, where, "generation", failed, f"{g.identical_rows}/{g.rows} rows identical")


def junit_xml(report: Report, name: str) -> str:
    """``report`` as a JUnit XML document, its suite named ``name`` (what was checked)."""
    suite = ET.Element("testsuite", name=name)
    if report.manifest:
        _case(suite, "files", "every file as loraexport.json lists it", manifest_failures(report.manifest))
    if report.proof is not None:
        _case(
            suite,
            "weights",
            "proof: each tensor the reference's",
            [f"[weights] {f}" for f in report.proof.failures],
        )
    for p in report.parity:
        _parity(suite, p)
    if report.half:
        figures = "; ".join(f"{h.dtype} {h.variant}: top-1 {h.top1_agreement}" for h in report.half)
        _case(suite, "quality.half_precision", "rounding keeps the adapter", report.half_failures, figures)
    if report.quantization:
        figures = "; ".join(
            f"{q.dtype}, adapter {q.adapter}: top-1 {q.top1_agreement}, adapter retained {q.adapter_retained}"
            for q in report.quantization
        )
        gated = "within the budget" if report.budget and report.budget.set else "reported (no budget set)"
        _case(suite, "quality.quantization", gated, report.quantization_failures, figures)
    for lat in report.latency:
        for c in lat.cases:
            medians = ", ".join(f"{k} {s.p50_ms:.3f} ms" for k, s in c.stats.items())
            _case(suite, f"latency.{lat.provider}", f"{c.batch}x{c.seq}", [], medians)
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", "0")
    if report.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(report.warnings)
    # a failure no test case holds (a rule added later) still fails the suite
    held = {c.find("failure").text for c in cases if c.find("failure") is not None}
    loose = [f for f in report.failures if not any(f.split("] ", 1)[-1] in (t or "") for t in held)]
    if loose:
        _case(suite, "gates", "other rules", loose)
        suite.set("tests", str(len(cases) + 1))
        suite.set("failures", str(int(suite.get("failures")) + 1))
    root = ET.Element(
        "testsuites", name="loraexport verify", tests=suite.get("tests"), failures=suite.get("failures")
    )
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
