"""Outputs that never harm an input: one place checks every output path and owns the swap.

``plan_output`` / ``plan_files`` check where a command writes, before any work (``plan``);
``write_output`` / ``write_files`` write into a temporary folder beside it and move the result
in at the end (``write``), with one atomic rename that never replaces what it was not told to
(``swap``).
"""

from loraexport.artifact.output.plan import (
    MANIFEST,
    OutputPlan,
    check_not_input,
    plan_files,
    plan_output,
    remove_stale,
)
from loraexport.artifact.output.swap import signals_deferred
from loraexport.artifact.output.write import dir_mode, write_files, write_output

__all__ = [
    "MANIFEST",
    "OutputPlan",
    "check_not_input",
    "dir_mode",
    "plan_files",
    "plan_output",
    "remove_stale",
    "signals_deferred",
    "write_files",
    "write_output",
]
