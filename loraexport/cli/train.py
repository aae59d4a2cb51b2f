"""``loraexport train``: parse, call ``loraexport.stages.train.train``, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loraexport.cli.options import force_option, json_option, log
from loraexport.cli.types import Names, Number, PositiveInt, Seed


@click.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory.")
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help='Training data, JSON Lines of {"source": ..., "target": ...}.',
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option(
    "--eval-data",
    type=click.Path(path_type=Path),
    help="Held-out data; default: hold out --eval-fraction of --data.",
)
@click.option(
    "--eval-fraction",
    default=0.1,
    show_default=True,
    type=Number(float, 0, 1, lo_open=True, hi_open=True),
    help="Held-out share when no --eval-data.",
)
@click.option(
    "--rank",
    "-r",
    default=8,
    show_default=True,
    type=PositiveInt(65536),
    help="LoRA rank r (at most the smallest dimension of a targeted layer).",
)
@click.option(
    "--alpha",
    default=16.0,
    show_default=True,
    type=Number(float, 0, 1e6, lo_open=True),
    help="LoRA alpha (scaling alpha/r).",
)
@click.option(
    "--targets", default="q,v", show_default=True, type=Names(), help="Comma-separated module names."
)
@click.option("--target-regex", help="A regex over full module paths instead of --targets.")
@click.option(
    "--dropout", default=0.0, show_default=True, type=Number(float, 0, 1, hi_open=True), help="LoRA dropout."
)
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rsLoRA).")
@click.option("--steps", default=600, show_default=True, type=PositiveInt(10**7), help="Optimizer steps.")
@click.option(
    "--lr",
    default=3e-3,
    show_default=True,
    type=Number(float, 0, 10, lo_open=True),
    help="Peak learning rate.",
)
@click.option("--batch-size", default=64, show_default=True, type=PositiveInt(65536))
@click.option("--seed", default=0, show_default=True, type=Seed(), help="Seed of the run (0 to 2**63 - 1).")
@force_option
@json_option("Print the result as JSON on stdout.")
@click.pass_context
def train(ctx, targets, target_regex, rslora, as_json, **options):
    """Train a LoRA adapter on a base model and save it in PEFT's format.

    \b
    Example:
      loraexport train --base samples/base --data samples/data/sort_train.jsonl \\
          --eval-data samples/data/sort_eval.jsonl --out runs/sort-adapter
    """
    from loraexport.stages.train import train as train_api

    result = train_api(
        targets=target_regex or targets,
        use_rslora=rslora,
        show_progress=not ctx.obj["quiet"],
        log=log(ctx),
        **options,
    )
    out = options["out"]
    summary = {
        "adapter": str(out),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "final_loss": result.final_loss,
        "trainable_parameters": result.trainable_parameters,
        "base_parameters": result.base_parameters,
        "trainable_fraction": result.trainable_fraction,
        "eval_exact_match_before": result.eval_before,
        "eval_exact_match_after": result.eval_after,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"trained {result.steps} steps in {result.seconds:.1f}s, final loss {result.final_loss:.4f}\n"
        f"trainable parameters {result.trainable_parameters:,} of {result.base_parameters:,} "
        f"({result.trainable_fraction:.2%})\n"
        f"held-out exact match: base {result.eval_before:.1%} -> with adapter {result.eval_after:.1%}\n"
        f"adapter written to {out}"
    )
