"""One exception hierarchy for everything a user can get wrong.

Library code raises these; only ``cli.py`` turns them into one line on stderr and the
exit code that each class carries (documented in README.md).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_VERIFICATION_FAILED = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_HANGUP = 129  # 128 + SIGHUP
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`loraexport inspect X | head`)


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an exception (by the console script), so that every cleanup
    path Ctrl-C takes — temporary outputs removed, nothing half-written left — runs for it too.
    ``signum`` says which; the exit code is 128 + signum, as a shell reports a signal."""

    def __init__(self, signum: int = 15, name: str = "SIGTERM") -> None:
        super().__init__(name)
        self.signum, self.name = signum, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class LoraExportError(Exception):
    """Base class of loraexport's own errors. Unexpected ones (bugs) exit with 1."""

    exit_code = EXIT_INTERNAL


class UsageError(LoraExportError):
    """Arguments that cannot work, found by the library (exit 2, as click's usage errors): an
    output that would be, contain or sit inside an input, a path that names no output."""

    exit_code = EXIT_USAGE


class InvalidInputError(LoraExportError):
    """Input files, formats or arguments that cannot be used (exit 3)."""

    exit_code = EXIT_INVALID_INPUT


class InputNotFoundError(InvalidInputError):
    """A path given on the command line does not exist or cannot be read."""


class ModelFormatError(InvalidInputError):
    """A model directory that is not one loraexport can load."""


class AdapterFormatError(InvalidInputError):
    """An adapter directory whose files are missing, unreadable or malformed."""


class UnsupportedAdapterError(InvalidInputError):
    """An adapter that uses a PEFT feature loraexport does not implement (DoRA, ...)."""


class AdapterMismatchError(InvalidInputError):
    """An adapter that does not fit the base model (module missing, shape mismatch)."""


class DataFormatError(InvalidInputError):
    """A training or evaluation data file that cannot be used."""


class TrainingDivergedError(InvalidInputError):
    """The training loss became NaN or infinite: nothing is written (exit 3)."""


class OutputExistsError(InvalidInputError):
    """The output path exists and ``--force`` was not given."""


class OutputTakenError(OutputExistsError):
    """Something else took the output path while the run worked; it was left alone (exit 3)."""


class OutputNotWritableError(InvalidInputError):
    """The output location cannot be written (permissions, full disk)."""


class ExportError(LoraExportError):
    """torch.onnx could not export the model (exit 1: report it, it is our bug or torch's)."""


class VerificationFailedError(LoraExportError):
    """Parity failed; the report has been written (exit 4). ``report`` holds it, when known."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
