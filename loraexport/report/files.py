"""report.json and report.md, as every command writes them."""

from __future__ import annotations

import json
from pathlib import Path

from loraexport.errors import VerificationFailedError
from loraexport.report.contents import Report


def report_texts(report: Report) -> tuple[str, str]:
    """report.json and report.md, as every command writes them."""
    return json.dumps(report.to_json(), indent=2) + "\n", report.to_markdown()


def write_report(report: Report, out_dir: Path) -> None:
    as_json, as_md = report_texts(report)
    (out_dir / "report.json").write_text(as_json, encoding="utf-8")
    (out_dir / "report.md").write_text(as_md, encoding="utf-8")


def raise_if_output_failed(report: Report, out: str | Path) -> None:
    """``VerificationFailedError`` (exit 4) for an output written whose verification failed."""
    if report.passed is False:
        raise VerificationFailedError(
            f"{report.verdict} ({'; '.join(report.failures[:2])}); "
            f"report written to {Path(out) / 'report.md'}",
            report,
        )
