"""Register ``analyze`` and ``sweep`` on the main group for CLI tests (a no-op once
``loraexport/cli.py`` registers them itself)."""

from __future__ import annotations

from loraexport.analyze.cli import analyze, sweep
from loraexport.cli import main

for _command in (analyze, sweep):
    if _command.name not in main.commands:
        main.add_command(_command)
