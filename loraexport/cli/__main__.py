"""``python -m loraexport.cli``: the console script."""

from loraexport.cli import run

run()
