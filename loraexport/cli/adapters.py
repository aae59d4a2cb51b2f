"""``convert-adapter``: a PEFT adapter as an onnxruntime adapter file for an adapter-mode export."""

from __future__ import annotations

import json

import click

from loraexport.cli.options import PATH, json_option, pickle_option


@click.command("convert-adapter")
@click.argument("adapter_dir", type=PATH)
@click.option("--onnx", "onnx_dir", required=True, type=PATH, help="An export made with --mode adapter.")
@click.option("--out", required=True, type=PATH, help="The .onnx_adapter file to write.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@pickle_option
@json_option("Print what was written as JSON.")
def convert_adapter(adapter_dir, onnx_dir, out, force, allow_pickle, as_json):
    """Convert a PEFT adapter into an onnxruntime adapter file (.onnx_adapter) for an export made
    with --mode adapter, without exporting again. Names, shapes and rank are checked against the
    graph before anything is written; each module's scaling is folded into its B.

    \b
    Example:
      loraexport convert-adapter runs/other-adapter --onnx runs/served --out runs/served/other.onnx_adapter
    """
    from loraexport.stages.export import convert_adapter as convert

    written = convert(adapter_dir, onnx_dir, out, force=force, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(written, indent=2))
    else:
        click.echo(f"wrote {written['file']} ({written['modules']} modules, {written['bytes'] / 1e6:.2f} MB)")
