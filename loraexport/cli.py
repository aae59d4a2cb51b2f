"""The ``loraexport`` command line. Parses, calls the library, prints; no logic of its own.

Library errors (``loraexport.errors``) become one line on stderr and their exit code here.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

import click

from loraexport.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, LoraExportError


class _Group(click.Group):
    """Turns loraexport errors into one line and an exit code; ``--debug`` shows tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except LoraExportError as e:
            _fail(ctx, f"error: {e}", e.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted: nothing was written", EXIT_INTERRUPTED)
        except Exception as e:  # a bug: say so, keep the traceback behind --debug
            _fail(ctx, f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                  EXIT_INTERNAL)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("debug"):
        traceback.print_exc()
    click.echo(message.splitlines()[0] if message else "error", err=True)
    ctx.exit(code)


def _quiet_third_parties(verbose: bool) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore")
    for name in ("torch", "torch.onnx", "onnxscript", "transformers", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and the final result.")
@click.option("--verbose", "-v", is_flag=True, help="Show third-party warnings and logs.")
@click.option("--debug", is_flag=True, help="Print a traceback on error.")
@click.version_option(package_name="loraexport")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool, debug: bool) -> None:
    """loraexport: train or load a LoRA adapter, merge it exactly, export to ONNX, verify.

    Exit codes: 0 success, 1 internal error (a bug), 2 usage error, 3 invalid input,
    4 verification failed (report still written), 130 interrupted.
    """
    ctx.obj = {"quiet": quiet, "verbose": verbose, "debug": debug}
    _quiet_third_parties(verbose)


def _say(ctx: click.Context, msg: str) -> None:
    if not ctx.obj["quiet"]:
        click.echo(msg, err=True)


def _split_targets(value: str) -> list[str] | str:
    items = [t.strip() for t in value.split(",") if t.strip()]
    if not items:
        raise click.BadParameter("give at least one module name, e.g. q,v")
    return items


# ---- train -------------------------------------------------------------------------------
@main.command()
@click.option("--base", required=True, type=click.Path(path_type=Path), help="Base model directory.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help='Training data, JSON Lines of {"source": ..., "target": ...}.')
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Adapter directory to write.")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Held-out data; default: hold out --eval-fraction of --data.")
@click.option("--eval-fraction", default=0.1, show_default=True, help="Held-out share when no --eval-data.")
@click.option("--rank", "-r", default=8, show_default=True, type=click.IntRange(1), help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scaling alpha/r).")
@click.option("--targets", default="q,v", show_default=True, help="Comma-separated module names.")
@click.option("--target-regex", help="A regex over full module paths instead of --targets.")
@click.option("--dropout", default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(r) (rsLoRA).")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=3e-3, show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_context
def train(ctx, base, data, out, eval_data, eval_fraction, rank, alpha, targets, target_regex,
          dropout, rslora, steps, lr, batch_size, seed, force, as_json):
    """Train a LoRA adapter on a base model and save it in PEFT's format.

    \b
    Example:
      loraexport train --base samples/base --data samples/data/sort_train.jsonl \\
          --eval-data samples/data/sort_eval.jsonl --out runs/sort-adapter
    """
    from loraexport.api import train as train_api

    result = train_api(
        base=base, data=data, out=out, eval_data=eval_data, eval_fraction=eval_fraction,
        rank=rank, alpha=alpha, targets=target_regex or _split_targets(targets), dropout=dropout,
        use_rslora=rslora, steps=steps, lr=lr, batch_size=batch_size, seed=seed, force=force,
        show_progress=not ctx.obj["quiet"],
    )
    summary = {
        "adapter": str(out), "steps": result.steps, "seconds": round(result.seconds, 2),
        "final_loss": result.final_loss, "trainable_parameters": result.trainable_parameters,
        "base_parameters": result.base_parameters, "trainable_fraction": result.trainable_fraction,
        "eval_exact_match_before": result.eval_before, "eval_exact_match_after": result.eval_after,
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


def run() -> None:  # pragma: no cover - console-script shim
    main(prog_name="loraexport")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
