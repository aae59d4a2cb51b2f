"""``loraexport train``: parse, call ``loraexport.stages.train.train``, print."""

from __future__ import annotations

import json
from pathlib import Path

import click

from loraexport.cli.options import force_option, json_option
from loraexport.cli.output import log
from loraexport.cli.types import Names, Number, PositiveInt, Seed, Warmup
from loraexport.training.options import MAX_ALPHA, MAX_GRAD_ACCUM, MAX_LENGTH, MAX_RANK, TrainOptions


def _target_regex(ctx, param, value):
    """A regex train can record (exit 2 here, not 3 blaming an adapter_config.json not yet written)."""
    from loraexport.core.untrusted import short_repr
    from loraexport.lora.config import target_regex_problem

    problem = None if value is None else target_regex_problem(value)
    if problem:
        raise click.BadParameter(f"{short_repr(value)}{problem}")
    return value


@click.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory.")
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path),
    help='Training data, JSON Lines: {"source", "target"} (reference Transformer); {"prompt", '
    '"completion"} or {"text"} (decoders); {"text", "label"} (classifiers).',
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
    type=PositiveInt(MAX_RANK),
    help="LoRA rank r (at most the smallest dimension of a targeted layer).",
)
@click.option(
    "--alpha",
    default=16.0,
    show_default=True,
    type=Number(float, 0, MAX_ALPHA, lo_open=True),
    help="LoRA alpha (scaling alpha/r).",
)
@click.option(
    "--targets",
    type=Names(),
    help="Comma-separated module names (default: the attention query and value projections: q,v; "
    "q_proj,v_proj for Llama, Mistral, Qwen2; c_attn for GPT-2; query,value for BERT, RoBERTa).",
)
@click.option(
    "--target-regex", callback=_target_regex, help="A regex over full module paths instead of --targets."
)
@click.option(
    "--dropout", default=0.0, show_default=True, type=Number(float, 0, 1, hi_open=True), help="LoRA dropout."
)
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rsLoRA).")
@click.option(
    "--dora", is_flag=True, help="DoRA (weight-decomposed LoRA): also train a magnitude per output row."
)
@click.option("--steps", default=600, show_default=True, type=PositiveInt(10**7), help="Optimizer steps.")
@click.option(
    "--lr",
    type=Number(float, 0, 10, lo_open=True),
    help="Peak learning rate (default: 3e-3 for the reference Transformer, 2e-4 for Hugging Face bases).",
)
@click.option(
    "--warmup",
    default=0.05,
    show_default=True,
    type=Warmup(),
    help="Linear warm-up, a fraction of --steps (below 1) or a number of steps; then cosine decay.",
)
@click.option(
    "--batch-size",
    type=PositiveInt(65536),
    help="Examples per micro-batch (default: 64 for the reference Transformer, 8 for Hugging Face bases).",
)
@click.option(
    "--grad-accum",
    default=1,
    show_default=True,
    type=PositiveInt(MAX_GRAD_ACCUM),
    help="Micro-batches per optimizer step (Hugging Face bases).",
)
@click.option(
    "--max-length",
    type=Number(int, 2, MAX_LENGTH),
    help="Tokens per example, at most; longer ones are refused (Hugging Face bases; default: 256, "
    "at most the model's positions).",
)
@click.option(
    "--pack", is_flag=True, help='Join {"text"} examples and cut them into rows of --max-length tokens.'
)
@click.option("--seed", default=0, show_default=True, type=Seed(), help="Seed of the run (0 to 2**63 - 1).")
@force_option
@json_option("Print the result as JSON on stdout.")
@click.pass_context
def train(ctx, targets, target_regex, rslora, dora, as_json, **options):
    """Train a LoRA adapter on a base model and save it in PEFT's format.

    The reference Transformer, Hugging Face decoders (GPT-2, Llama, Mistral, Qwen2) and
    sequence classifiers (BERT, RoBERTa with a *ForSequenceClassification head, trained too).

    \b
    Examples:
      loraexport train --base samples/base --data samples/data/sort_train.jsonl \\
          --eval-data samples/data/sort_eval.jsonl --out runs/sort-adapter
      loraexport train --base runs/real/smollm2 --data chat.jsonl --out runs/chat-adapter \\
          --max-length 512 --batch-size 4 --grad-accum 4 --steps 300
    """
    from loraexport.stages.train import train as train_api

    base, data, out, force = (options.pop(k) for k in ("base", "data", "out", "force"))
    train_options = TrainOptions(targets=target_regex or targets, use_rslora=rslora, use_dora=dora, **options)
    result = train_api(
        base, data, out, train_options, force=force, show_progress=not ctx.obj["quiet"], log=log(ctx)
    )
    summary = {
        "adapter": str(out),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "final_loss": result.final_loss,
        "trainable_parameters": result.trainable_parameters,
        "base_parameters": result.base_parameters,
        "trainable_fraction": result.trainable_fraction,
        **result.evals(),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rate = f" ({result.tokens / result.seconds:,.0f} tokens/s)" if result.tokens and result.seconds else ""
    lines = [
        f"trained {result.steps} steps in {result.seconds:.1f}s, final loss {result.final_loss:.4f}{rate}",
        f"trainable parameters {result.trainable_parameters:,} of {result.base_parameters:,} "
        f"({result.trainable_fraction:.2%})",
    ]
    if result.eval_loss_before is not None:
        lines.append(
            f"held-out loss: base {result.eval_loss_before:.4f} -> with adapter {result.eval_loss_after:.4f}"
        )
    if result.metric is not None and result.eval_before is not None:
        lines.append(
            f"held-out {result.metric.replace('_', ' ')}: base {result.eval_before:.1%} -> "
            f"with adapter {result.eval_after:.1%}"
        )
    click.echo("\n".join([*lines, f"adapter written to {out}"]))
