"""The ``loraexport`` group: one line and an exit code for every error, signals, quiet libraries.

Library errors (``loraexport.errors``) carry their exit code; here they become one line on
stderr. click's own usage errors are one line too, and Ctrl-C or a signal, whenever it comes,
is an interruption with its exit code (128 + the signal), never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

import click

from loraexport.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    LoraExportError,
    Terminated,
    first_line,
)

QUIETED_LOGGERS = ("torch", "torch.onnx", "onnxscript", "transformers", "onnx_ir")


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


def _fail(ctx: click.Context, message: str, code: int) -> None:
    if (ctx.obj or {}).get("debug"):
        traceback.print_exc()
    click.echo(message.splitlines()[0] if message else "error", err=True)
    ctx.exit(code)


class Group(click.Group):
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


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
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
    if not verbose:  # the CLI owns the process: third parties speak only with --verbose
        warnings.filterwarnings("ignore")
        for name in QUIETED_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
