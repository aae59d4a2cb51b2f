"""One version: the package's ``__version__`` is what pyproject.toml (and so pip) says."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import loraexport
from loraexport._version import __version__


def test_version_is_pyprojects():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    declared = re.search(r'^version = "([^"]+)"', text, re.M).group(1)  # (tomllib is 3.11+)
    assert __version__ == loraexport.__version__ == declared
    assert importlib.metadata.version("loraexport") == __version__
