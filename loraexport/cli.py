"""The ``loraexport`` command line. Parses, calls the library, prints; no logic of its own.

Library errors (``loraexport.errors``) become one line on stderr and their exit code here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

import click

from loraexport.analyze.cli import analyze as analyze_cmd
from loraexport.analyze.cli import sweep as sweep_cmd
from loraexport.cli_types import MAX_OPSET, MAX_OPSET_TORCHSCRIPT, MIN_OPSET, Number, PositiveInt, Seed
from loraexport.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    LoraExportError,
    Terminated,
    first_line,
)


def _interrupted(e: BaseException, written: str | None = None) -> tuple[str, int]:
    """The one line and exit code for Ctrl-C (130) or a signal (128 + its number)."""
    detail = f"{written} was written completely" if written else "nothing was written"
    if isinstance(e, Terminated):
        what = "terminated" if e.name == "SIGTERM" else f"terminated ({e.name})"
        return f"{what}: {detail}", e.exit_code
    return f"interrupted: {detail}", EXIT_INTERRUPTED


def _usage_line(e: click.ClickException) -> str:
    """click's usage errors as one line: the message, then where to read more."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.UsageError) and ctx else ""
    return f"error: {message}{hint}"


class _Group(click.Group):
    """Turns loraexport errors into one line and an exit code; ``--debug`` shows tracebacks."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own errors (usage, bad values) as one line too, and Ctrl-C or a signal
        while the arguments are parsed as an interruption, not click's "Aborted!" (exit 1)."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort as e:
            line, code = _interrupted(e.__cause__ or e.__context__ or e)
            click.echo(line, err=True)
            sys.exit(code)
        except click.ClickException as e:
            click.echo(_usage_line(e), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:  # after click's own handling
            line, code = _interrupted(e)
            click.echo(line, err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # the reader of stdout went away (`| head`): end as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush there
            ctx.exit(EXIT_BROKEN_PIPE)
        except LoraExportError as e:
            _fail(ctx, f"error: {e}", e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (Terminated)
            # loraexport_written: set when the signal came just after the output was complete
            _fail(ctx, *_interrupted(e, getattr(e, "loraexport_written", None)))
        except Exception as e:  # a bug: say so, keep the traceback behind --debug
            first = first_line(e) if str(e).strip() else ""
            _fail(
                ctx,
                f"internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
                EXIT_INTERNAL,
            )


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("debug"):
        traceback.print_exc()
    click.echo(message.splitlines()[0] if message else "error", err=True)
    ctx.exit(code)


def _quiet_third_parties(verbose: bool) -> None:
    if verbose:
        from loraexport.export import onnx as onnx_export

        onnx_export.SILENCE_EXPORTER_LOGS = False
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
    4 verification failed (report still written), 129 hangup (SIGHUP), 130 interrupted
    (Ctrl-C), 143 terminated (SIGTERM). An output is never an input and never replaces
    anything but a previous output of loraexport (with --force).
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
@click.option("--targets", default="q,v", show_default=True, help="Comma-separated module names.")
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
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.pass_context
def train(
    ctx,
    base,
    data,
    out,
    eval_data,
    eval_fraction,
    rank,
    alpha,
    targets,
    target_regex,
    dropout,
    rslora,
    steps,
    lr,
    batch_size,
    seed,
    force,
    as_json,
):
    """Train a LoRA adapter on a base model and save it in PEFT's format.

    \b
    Example:
      loraexport train --base samples/base --data samples/data/sort_train.jsonl \\
          --eval-data samples/data/sort_eval.jsonl --out runs/sort-adapter
    """
    from loraexport.api import train as train_api

    result = train_api(
        base=base,
        data=data,
        out=out,
        eval_data=eval_data,
        eval_fraction=eval_fraction,
        rank=rank,
        alpha=alpha,
        targets=target_regex or _split_targets(targets),
        dropout=dropout,
        use_rslora=rslora,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        force=force,
        show_progress=not ctx.obj["quiet"],
        log=_log(ctx),
    )
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


# ---- merge / export / verify / merge-and-export ---------------------------------------------
def _log(ctx: click.Context):
    return (lambda msg: None) if ctx.obj["quiet"] else (lambda msg: click.echo(msg, err=True))


def _exporter_log(ctx: click.Context, result) -> None:
    """With --verbose: what torch.onnx printed while it exported (captured, fd level included)."""
    if ctx.obj["verbose"] and result is not None and result.exporter_log.strip():
        click.echo(result.exporter_log.rstrip(), err=True)


def _print_report(ctx: click.Context, report, out: Path | None, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    rows = report.summary_rows()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if out is not None:
        click.echo(f"{'report':<{width}}  {out / 'report.md'} (and report.json)")


# readable=False: the library checks paths and says what is wrong in one line (exit 3)
_path = click.Path(path_type=Path, readable=False)


def _adapter_options(required: bool = True):
    """``--adapter`` (repeatable) and ``--weight`` (one per adapter, in order)."""

    def deco(f):
        f = click.option(
            "--weight",
            "weights",
            multiple=True,
            type=Number(float),
            help="Weight of each --adapter, in order (default 1.0 each): W0 + Σ w·s·B·A.",
        )(f)
        return click.option(
            "--adapter",
            "adapters",
            required=required,
            multiple=True,
            type=_path,
            help="PEFT adapter directory; repeat to combine several.",
        )(f)

    return deco


def _check_weights(adapters, weights) -> list[float] | None:
    if weights and len(weights) != len(adapters):
        raise click.BadParameter(
            f"{len(adapters)} --adapter but {len(weights)} --weight", param_hint="--weight"
        )
    return list(weights) or None


@main.command()
@click.option("--base", required=True, type=_path, help="Base model directory.")
@_adapter_options()
@click.option("--out", required=True, type=_path, help="Merged model directory to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Storage dtype of the merged weights (default: the base's).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load adapter_model.bin (weights_only=True).")
@click.option("--json", "as_json", is_flag=True, help="Print the merge statistics as JSON.")
@click.pass_context
def merge(ctx, base, adapters, weights, out, dtype, force, allow_pickle, as_json):
    """Merge LoRA adapter(s) into the base weights: W' = W0 + Σ w·s·B·A.

    The sum is computed in float64 and cast once to the storage dtype; merge.json in the
    output records, per module, max|ΔW| and the error the cast introduced.

    \b
    Example:
      loraexport merge --base samples/base --adapter runs/demo-adapter --out runs/merged
    """
    from loraexport.pipeline import merge as merge_api

    stats = merge_api(
        base,
        list(adapters),
        out,
        weights=_check_weights(adapters, weights),
        dtype=dtype,
        force=force,
        allow_pickle=allow_pickle,
        show_progress=not ctx.obj["quiet"],
        log=_log(ctx),
    )
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps(asdict(stats), indent=2))
        return
    worst = max(stats.modules, key=lambda m: m.cast_max_rel_err)
    click.echo(
        f"merged {stats.modules_merged} modules ({stats.compute_dtype} → {stats.storage_dtype}) "
        f"into {out}; largest cast error {worst.cast_max_abs_err:.2g} ({worst.module})"
    )


def _export_options(f):
    """--opset, --exporter and --dtype, shared by export and merge-and-export."""
    f = click.option(
        "--dtype",
        type=click.Choice(["float32", "float16", "bfloat16"]),
        help="Store the ONNX weights in this dtype (merged weights rounded once; computation stays float32).",
    )(f)
    f = click.option(
        "--exporter",
        type=click.Choice(["dynamo", "torchscript"]),
        help="torch.onnx exporter (default: dynamo for the reference model, torchscript for HF models).",
    )(f)
    return click.option(
        "--opset",
        default=MIN_OPSET,
        show_default=True,
        type=Number(int, MIN_OPSET, MAX_OPSET),
        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} "
        f"(the torchscript exporter writes up to {MAX_OPSET_TORCHSCRIPT}).",
    )(f)


@main.command()
@click.option("--model", "model_dir", required=True, type=_path, help="Model directory (base or merged).")
@_adapter_options(required=False)
@click.option("--out", required=True, type=_path, help="Output directory for the ONNX file(s).")
@_export_options
@click.option(
    "--mode",
    type=click.Choice(["merged", "unmerged"]),
    default="merged",
    show_default=True,
    help="With --adapter: merge it, or keep the LoRA branches in the graph.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load adapter_model.bin (weights_only=True).")
@click.pass_context
def export(ctx, model_dir, adapters, weights, out, opset, exporter, mode, dtype, force, allow_pickle):
    """Export a model (optionally with adapters, merged or not) to ONNX.

    \b
    Example:
      loraexport export --model samples/base --adapter runs/demo-adapter --out runs/onnx
    """
    from loraexport.pipeline import export as export_api

    _log(ctx)("exporting to ONNX …")
    result = export_api(
        model_dir,
        out,
        adapter=list(adapters) or None,
        weights=_check_weights(adapters, weights),
        mode=mode,
        dtype=dtype,
        opset=opset,
        exporter=exporter,
        force=force,
        allow_pickle=allow_pickle,
        log=_log(ctx),
    )
    _exporter_log(ctx, result)
    click.echo(
        f"exported {', '.join(result.files)} ({result.bytes / 1e6:.2f} MB, opset {result.opset}, "
        f"{result.seconds:.1f} s) to {out}"
    )


def _verify_options(f):
    for opt in reversed(
        [
            click.option(
                "--provider",
                "providers",
                multiple=True,
                type=click.Choice(["cpu", "cuda"]),
                help="onnxruntime provider(s); default CPU, plus CUDA when available.",
            ),
            click.option(
                "--samples",
                default=6,
                show_default=True,
                type=PositiveInt(1000),
                help="Parity cases (batch sizes and lengths vary).",
            ),
            click.option(
                "--eval-data", type=_path, help="JSON Lines whose sources are used as generation prompts."
            ),
            click.option("--no-latency", is_flag=True, help="Skip the latency measurement."),
            click.option(
                "--half",
                multiple=True,
                type=click.Choice(["float16", "bfloat16"]),
                help="Also report what storing the merged weights in this dtype costs (repeatable).",
            ),
            click.option(
                "--threads",
                type=PositiveInt(256),
                help="Threads for torch and onnxruntime (default: cores).",
            ),
            click.option("--allow-pickle", is_flag=True, help="Load adapter_model.bin (weights_only=True)."),
            click.option("--json", "as_json", is_flag=True, help="Print report.json on stdout."),
        ]
    ):
        f = opt(f)
    return f


@main.command()
@click.option("--base", type=_path, help="Base model directory.  [required unless --check-files]")
@_adapter_options(required=False)
@click.option(
    "--onnx",
    "onnx_dir",
    type=_path,
    help="Exported (merged) ONNX directory.  [required unless --check-files]",
)
@click.option(
    "--report",
    "report_path",
    type=_path,
    help="Write report.json here (and report.md beside it); never into an input.",
)
@click.option("--force", is_flag=True, help="Replace a previous --report.")
@click.option(
    "--check-files",
    "check_files",
    type=_path,
    help="Only re-check the sha256 of every file in this loraexport output against its loraexport.json.",
)
@_verify_options
@click.pass_context
def verify(
    ctx,
    base,
    adapters,
    weights,
    onnx_dir,
    report_path,
    check_files,
    force,
    providers,
    samples,
    eval_data,
    no_latency,
    half,
    threads,
    allow_pickle,
    as_json,
):
    """Check an exported model against base + adapter unmerged: parity and latency.

    Exit 4 when parity fails (the report is still written). With --check-files DIR: only
    check that every file DIR's loraexport.json lists is there, unchanged (exit 4 if not).

    \b
    Examples:
      loraexport verify --base samples/base --adapter runs/demo-adapter --onnx runs/demo
      loraexport verify --check-files runs/demo
    """
    from loraexport.errors import VerificationFailedError
    from loraexport.pipeline import verify as verify_api

    if check_files is not None:
        _check_files(ctx, check_files, as_json)
        return
    for value, name in ((base, "--base"), (adapters, "--adapter"), (onnx_dir, "--onnx")):
        if not value:
            raise click.UsageError(f"Missing option '{name}' (required unless --check-files).")
    report = verify_api(
        base,
        list(adapters),
        onnx_dir,
        weights=_check_weights(adapters, weights),
        providers=list(providers) or None,
        samples=samples,
        eval_data=eval_data,
        latency=not no_latency,
        half=tuple(half),
        threads=threads,
        allow_pickle=allow_pickle,
        report_path=report_path,
        force=force,
        log=_log(ctx),
    )
    _print_report(ctx, report, None, as_json)
    if report.passed is False:
        raise VerificationFailedError(f"{report.verdict}: {'; '.join(report.failures[:2])}")


def _check_files(ctx: click.Context, directory: Path, as_json: bool) -> None:
    from loraexport.errors import VerificationFailedError
    from loraexport.manifest import check_manifest

    result = check_manifest(directory)
    if as_json:
        keys = ("checked", "changed", "missing", "unlisted")
        click.echo(
            json.dumps({"directory": str(directory), "ok": result.ok} | {k: getattr(result, k) for k in keys})
        )
    elif result.unlisted:
        _say(ctx, f"not in the manifest (not checked): {', '.join(result.unlisted)}")
    if not result.ok:
        what = [f"changed: {', '.join(result.changed)}"] * bool(result.changed)
        what += [f"missing: {', '.join(result.missing)}"] * bool(result.missing)
        raise VerificationFailedError(f"{directory}: files do not match loraexport.json ({'; '.join(what)})")
    if not as_json:
        click.echo(f"{directory}: {result.checked} files match loraexport.json (sha256)")


@main.command("merge-and-export")
@click.option("--base", required=True, type=_path, help="Base model directory.")
@_adapter_options()
@click.option("--out", required=True, type=_path, help="Output directory (written atomically).")
@_export_options
@click.option("--no-verify", is_flag=True, help="Skip parity and latency.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_verify_options
@click.pass_context
def merge_and_export(
    ctx,
    base,
    adapters,
    weights,
    out,
    opset,
    exporter,
    dtype,
    no_verify,
    force,
    providers,
    samples,
    eval_data,
    no_latency,
    half,
    threads,
    allow_pickle,
    as_json,
):
    """Merge an adapter, export to ONNX, verify parity and latency, write report.md/json.

    Exit 0 when parity passes, 4 when it fails (the output and report are still written).

    \b
    Example:
      loraexport merge-and-export --base samples/base --adapter runs/demo-adapter --out runs/demo
    """
    from loraexport.errors import VerificationFailedError
    from loraexport.pipeline import merge_and_export as mae

    try:
        report = mae(
            base,
            list(adapters),
            out,
            weights=_check_weights(adapters, weights),
            dtype=dtype,
            providers=list(providers) or None,
            verify_output=not no_verify,
            latency=not no_latency,
            half=tuple(half),
            force=force,
            opset=opset,
            exporter=exporter,
            samples=samples,
            eval_data=eval_data,
            threads=threads,
            allow_pickle=allow_pickle,
            log=_log(ctx),
        )
    except VerificationFailedError as e:
        _exporter_log(ctx, e.report.export)
        _print_report(ctx, e.report, out, as_json)
        raise
    _exporter_log(ctx, report.export)
    _print_report(ctx, report, out, as_json)


@main.command("inspect")
@click.argument("path", type=_path)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect_cmd(path, as_json):
    """Say what PATH is: a PEFT adapter, a model directory or an exported directory.

    \b
    Example:
      loraexport inspect runs/demo-adapter
    """
    from loraexport.api import inspect_path

    info = inspect_path(path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k:<{width}}  {v}")


main.add_command(analyze_cmd)  # loraexport analyze (loraexport/analyze/cli.py)
main.add_command(sweep_cmd)  # loraexport sweep


def _terminate(signum, frame) -> None:
    raise Terminated(signum, signal.Signals(signum).name)


def run() -> None:  # pragma: no cover - console-script shim
    # SIGTERM (a CI job's timeout, `kill`) and SIGHUP (the terminal closed) clean up like
    # Ctrl-C: no temporary output is left.
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _terminate)
    main(prog_name="loraexport")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
