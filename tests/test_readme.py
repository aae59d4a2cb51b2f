"""README's promises are held by tests: every line of "What loraexport will never do" names
tests, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## What loraexport will never do"


def _section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_promise_names_existing_tests():
    promises = [p for p in re.split(r"\n- ", _section()) if p.startswith("**")]
    assert len(promises) >= 6
    for promise in promises:
        refs = re.findall(r"`((?:tests/[\w/]+\.py)?::\w+|tests/[\w/]+\.py::\w+)`", promise)
        assert refs, f"no test named for: {promise[:60]}"
        current = None
        for ref in refs:
            path, _, name = ref.partition("::")
            current = REPO / path if path else current
            assert current is not None and current.is_file(), ref
            assert name in _tests_in(current), f"{ref} ({current.name}) does not exist"
