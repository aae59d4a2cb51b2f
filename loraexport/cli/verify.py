"""``verify``: parity and latency of an export, or (``--check-files``) its files' sha256."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loraexport.cli.options import PATH, adapter_options, junit_option, verify_options
from loraexport.cli.output import junit_plan, log, print_report, run_of, write_junit
from loraexport.core.enums import ExportMode
from loraexport.errors import VerificationFailedError


@click.command()
@click.option("--base", type=PATH, help="Base model directory.  [required unless --check-files]")
@adapter_options(required=False)
@click.option(
    "--onnx",
    "onnx_dir",
    type=PATH,
    help="Exported (merged) ONNX directory.  [required unless --check-files]",
)
@click.option(
    "--report",
    "report_path",
    type=PATH,
    help="Write report.json here (and report.md beside it); never into an input.",
)
@click.option("--force", is_flag=True, help="Replace a previous --report.")
@click.option(
    "--mode",
    type=click.Choice(ExportMode.choices()),
    help=(
        "What the export must be (default: what its loraexport.json says). adapter: each --adapter "
        "is checked against its own unmerged model through the graph's adapter inputs."
    ),
)
@click.option(
    "--check-files",
    "check_files",
    type=PATH,
    help="Only re-check the sha256 of every file in this loraexport output against its loraexport.json.",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help=(
        "Llama, Mistral, Qwen2: compute the unmerged reference layer by layer from the checkpoint, in "
        "memory bounded by a layer (default: for a streamed export, or a model that would not fit)."
    ),
)
@junit_option
@verify_options
@click.pass_context
def verify(ctx, verify_options, check_files, force, allow_pickle, as_json, junit, **args):
    """Check an exported model against base + adapter unmerged: parity and latency.

    Exit 4 when parity fails (the report is still written). With --check-files DIR: only
    check that every file DIR's loraexport.json lists is there, unchanged (exit 4 if not).

    \b
    Examples:
      loraexport verify --base samples/base --adapter runs/demo-adapter --onnx runs/demo
      loraexport verify --check-files runs/demo
    """
    if check_files is not None:
        _check_files(ctx, check_files, as_json)
        return
    base, adapters, onnx_dir = args["base"], args["adapters"], args["onnx_dir"]
    for value, name in ((base, "--base"), (adapters, "--adapter"), (onnx_dir, "--onnx")):
        if not value:
            raise click.UsageError(f"Missing option '{name}' (required unless --check-files).")
    from loraexport.stages.verify import verify as verify_api

    inputs = {
        "--base": base,
        "--adapter": list(adapters),
        "--onnx": onnx_dir,
        "--eval-data": verify_options.eval_data,
    }
    report = args["report_path"]
    outputs = {"--report": [report, Path(report).with_suffix(".md")]} if report is not None else {}
    plan = junit_plan(junit, force, inputs, outputs)
    try:
        report = verify_api(
            base,
            list(adapters),
            onnx_dir,
            verify_options,
            weights=list(args["weights"]) or None,
            report_path=args["report_path"],
            run=run_of(ctx, force, allow_pickle),
            mode=args["mode"],
            stream=args["stream"],
        )
    except VerificationFailedError as e:
        write_junit(plan, e.report, f"loraexport verify {onnx_dir}")
        print_report(e.report, None, as_json)
        raise
    write_junit(plan, report, f"loraexport verify {onnx_dir}")
    print_report(report, None, as_json)


def _check_files(ctx: click.Context, directory, as_json: bool) -> None:
    from loraexport.artifact.manifest import check_files

    try:
        result = check_files(directory)
    except VerificationFailedError as e:
        if as_json:
            click.echo(json.dumps(e.report.to_json()))
        raise
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    if result.unlisted:
        log(ctx)(f"not in the manifest (not checked): {', '.join(result.unlisted)}")
    click.echo(f"{directory}: {result.checked} files match loraexport.json (sha256)")
