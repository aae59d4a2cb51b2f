"""The ``loraexport`` command line: parses, calls the library, prints; no logic of its own.

``group`` (errors → one line and an exit code), ``types`` (numbers that refuse what cannot
work), ``options`` (the options commands share, printing), ``commands`` (merge, export,
merge-and-export, inspect), ``adapters`` (convert-adapter), ``verify``, ``train``, ``analyze``
(analyze, sweep). click is
imported nowhere else in the package.
"""

from __future__ import annotations

import signal
import sys

from loraexport.cli.adapters import convert_adapter
from loraexport.cli.analyze import analyze, sweep
from loraexport.cli.commands import export, inspect_cmd, merge, merge_and_export
from loraexport.cli.group import main
from loraexport.cli.train import train
from loraexport.cli.verify import verify
from loraexport.errors import Terminated

for _command in (
    train,
    merge,
    export,
    convert_adapter,
    verify,
    merge_and_export,
    inspect_cmd,
    analyze,
    sweep,
):
    main.add_command(_command)

__all__ = ["main", "run"]


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
