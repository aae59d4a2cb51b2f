"""``merge``, ``export``, ``merge-and-export`` and ``inspect``: parse, call the library, print.
The library checks everything and raises; the group turns that into one line."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from loraexport.cli.options import (
    PATH,
    adapter_options,
    export_options,
    force_option,
    json_option,
    junit_option,
    mode_option,
    pickle_option,
    serve_mode_option,
    verify_options,
)
from loraexport.cli.output import (
    exporter_log,
    junit_plan,
    log,
    print_report,
    print_table,
    run_of,
    write_junit,
)
from loraexport.core.enums import Precision
from loraexport.errors import VerificationFailedError


@click.command()
@click.option("--base", required=True, type=PATH, help="Base model directory.")
@adapter_options()
@click.option("--out", required=True, type=PATH, help="Merged model directory to write.")
@click.option(
    "--dtype",
    type=click.Choice(Precision.choices()),
    help="Storage dtype of the merged weights (default: the base's).",
)
@force_option
@pickle_option
@json_option("Print the merge statistics as JSON.")
@click.pass_context
def merge(ctx, dtype, as_json, force, allow_pickle, **paths):
    """Merge LoRA adapter(s) into the base weights: W' = W0 + Σ w·s·B·A.

    The sum is computed in float64 and cast once to the storage dtype; merge.json in the
    output records, per module, max|ΔW| and the error the cast introduced.

    \b
    Example:
      loraexport merge --base samples/base --adapter runs/demo-adapter --out runs/merged
    """
    from loraexport.stages.merge import merge as merge_api

    base, adapters, weights, out = paths["base"], paths["adapters"], paths["weights"], paths["out"]
    run = run_of(ctx, force, allow_pickle)
    stats = merge_api(base, list(adapters), out, weights=list(weights) or None, dtype=dtype, run=run)
    if as_json:
        click.echo(json.dumps(asdict(stats), indent=2))
        return
    worst = max(stats.modules, key=lambda m: m.cast_max_rel_err)
    click.echo(
        f"merged {stats.modules_merged} modules ({stats.compute_dtype} → {stats.storage_dtype}) "
        f"into {out}; largest cast error {worst.cast_max_abs_err:.2g} ({worst.module})"
    )


@click.command()
@click.option("--model", "model_dir", required=True, type=PATH, help="Model directory (base or merged).")
@adapter_options(required=False)
@click.option("--out", required=True, type=PATH, help="Output directory for the ONNX file(s).")
@export_options
@mode_option
@force_option
@pickle_option
@click.pass_context
def export(ctx, model_dir, adapters, weights, out, spec, force, allow_pickle):
    """Export a model (optionally with adapters, merged or not) to ONNX.

    \b
    Example:
      loraexport export --model samples/base --adapter runs/demo-adapter --out runs/onnx
    """
    from loraexport.stages.export import export as export_api

    log(ctx)("exporting to ONNX …")
    run = run_of(ctx, force, allow_pickle)
    result = export_api(
        model_dir, out, spec, adapter=list(adapters) or None, weights=list(weights) or None, run=run
    )
    exporter_log(ctx, result)
    click.echo(
        f"exported {', '.join(result.files)} ({result.bytes / 1e6:.2f} MB, opset {result.opset}, "
        f"{result.seconds:.1f} s) to {out}"
    )


@click.command("merge-and-export")
@click.option("--base", required=True, type=PATH, help="Base model directory.")
@adapter_options()
@click.option("--out", required=True, type=PATH, help="Output directory (written atomically).")
@export_options
@serve_mode_option
@click.option("--no-verify", is_flag=True, help="Skip parity and latency.")
@force_option
@junit_option
@verify_options
@click.pass_context
def merge_and_export(ctx, spec, verify_options, no_verify, force, allow_pickle, as_json, **paths):
    """Merge an adapter, export to ONNX, verify parity and latency, write report.md/json.

    Exit 0 when parity passes, 4 when it fails (the output and report are still written).

    \b
    Example:
      loraexport merge-and-export --base samples/base --adapter runs/demo-adapter --out runs/demo
    """
    from loraexport.pipeline import merge_and_export as mae

    base, adapters, weights, out = paths["base"], paths["adapters"], paths["weights"], paths["out"]
    run = run_of(ctx, force, allow_pickle, verify_output=not no_verify)
    inputs = {
        "--base": base,
        "--adapter": list(adapters),
        "--out": out,
        "--eval-data": verify_options.eval_data,
    }
    plan = junit_plan(paths["junit"], force, inputs)
    try:
        report = mae(base, list(adapters), out, spec, verify_options, weights=list(weights) or None, run=run)
    except VerificationFailedError as e:
        write_junit(plan, e.report, f"loraexport merge-and-export {out}")
        exporter_log(ctx, e.report.export)
        print_report(e.report, out, as_json)
        raise
    write_junit(plan, report, f"loraexport merge-and-export {out}")
    exporter_log(ctx, report.export)
    print_report(report, out, as_json)


@click.command("inspect")
@click.argument("path", type=PATH)
@json_option("Print as JSON.")
def inspect_cmd(path, as_json):
    """Say what PATH is: a PEFT adapter, a model directory or an exported directory.

    \b
    Example:
      loraexport inspect runs/demo-adapter
    """
    from loraexport.stages.inspect import inspect_path

    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    print_table(info)
