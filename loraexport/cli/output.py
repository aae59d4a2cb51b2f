"""What the commands print, and how they run: progress lines on stderr (none with --quiet), the
exporter's captured output with --verbose, reports and tables on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from loraexport.spec import Run

if TYPE_CHECKING:
    from loraexport.artifact.output import OutputPlan


def log(ctx: click.Context):
    """Progress messages for stderr, or nothing with --quiet."""
    return (lambda msg: None) if ctx.obj["quiet"] else (lambda msg: click.echo(msg, err=True))


def run_of(
    ctx: click.Context, force: bool = False, allow_pickle: bool = False, verify_output: bool = True
) -> Run:
    """How the command runs: its --force, --allow-pickle and, for merge-and-export, --no-verify;
    progress on stderr unless --quiet."""
    return Run(force, allow_pickle, log(ctx), not ctx.obj["quiet"], verify_output)


def exporter_log(ctx: click.Context, result) -> None:
    """With --verbose: what torch.onnx printed while it exported (captured, fd level included)."""
    if ctx.obj["verbose"] and result is not None and result.exporter_log.strip():
        click.echo(result.exporter_log.rstrip(), err=True)


def print_report(report, out: Path | None, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    rows = report.summary_rows()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if out is not None:
        click.echo(f"{'report':<{width}}  {out / 'report.md'} (and report.json)")


def print_table(info: dict) -> None:
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k:<{width}}  {v}")


def junit_plan(path, force: bool, inputs: dict, outputs: dict | None = None) -> OutputPlan | None:
    """``--junit FILE`` checked as every output is, before any work (None without it), and kept
    apart from the run's other ``outputs`` (``--report`` and its .md, ``--out``)."""
    if path is None:
        return None
    from loraexport.artifact.output import plan_files
    from loraexport.artifact.output.plan import check_apart

    check_apart(Path(path), "--junit", outputs or {})
    return plan_files([Path(path)], force=force, inputs=inputs, label="--junit")


def write_junit(plan: OutputPlan | None, report, name: str) -> None:
    """The report's checks as JUnit XML (``report.junit``), written atomically."""
    if plan is None or report is None:
        return
    from loraexport.artifact.output import write_files
    from loraexport.report.junit import junit_xml

    write_files(plan, {plan.targets[0]: junit_xml(report, name)})
