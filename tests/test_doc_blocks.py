"""Every command block of README.md and docs/*.md runs as written, in order, on a fresh copy of
the repository (``tests/doc_blocks.py`` says how blocks are found, marked and run).

``make test`` runs the fast blocks (and checks the documents' shape); ``make test-docs`` runs
every block, the ``<!-- slow -->`` ones included. ``LORAEXPORT_DOC_SKIP="make bench,make fuzz"``
skips each block with one of these commands on a line of its own (comments aside); skipped
blocks are listed. For a partial run by hand.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from doc_blocks import (
    KINDS,
    NESTED,
    REPO,
    all_blocks,
    documents,
    environment,
    fresh_copy,
    installed_venv,
    run_block,
)

pytestmark = pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="run by a documentation block")

DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
TEST_COUNT = re.compile(r"\b\d[\d,]* (?:tests|test cases)\b")
README_LINES = 250
FAST_TIMEOUT = 300  # seconds, per fast block


def _docs() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def test_readme_is_short_and_undated():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines; at most {README_LINES}"
    dated = [f"README.md:{n}: {t}" for n, t in enumerate(lines, 1) if DATE.search(t)]
    assert not dated, "dated figures live in docs/measurements.md:\n" + "\n".join(dated)


def test_dates_only_in_measurements():
    dated = [
        f"{p.relative_to(REPO)}:{n}"
        for p in _docs()
        if p.name != "measurements.md"
        for n, t in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if DATE.search(t)
    ]
    assert not dated, "dated figures live in docs/measurements.md: " + ", ".join(dated)


def test_no_test_count_written_by_hand():
    for p in [REPO / "README.md", REPO / "Makefile", *_docs()]:
        for n, t in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            assert not TEST_COUNT.search(t), f"{p.relative_to(REPO)}:{n}: a test count: {t.strip()}"


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces → -."""
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # no headings in code blocks
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_doc_is_linked_from_readme_and_every_link_resolves():
    linked = documents()[1:]
    assert sorted(linked) == _docs(), "README.md links every docs/*.md (its reading order)"
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    for p in [REPO / "README.md", *_docs()]:
        for target, anchor in link.findall(p.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            page = p.parent / target if target else p
            assert page.exists(), f"{p.relative_to(REPO)}: broken link {target}"
            if anchor and page.suffix == ".md":
                assert anchor in _anchors(page), f"{p.relative_to(REPO)}: no heading for {target}#{anchor}"


def test_every_block_says_what_it_is():
    bad = [b.where + f" ```{b.kind}" for b in all_blocks() if b.kind not in KINDS]
    assert not bad, f"fences are ```sh, ```python or ```text: {bad}"
    slow_text = [b.where for b in all_blocks() if b.slow and b.kind == "text"]
    assert not slow_text, f"<!-- slow --> marks a runnable block: {slow_text}"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    for b in (b for b in all_blocks() if b.target is not None):
        assert b.kind in ("sh", "python"), f"{b.where}: <!-- {b.target} --> marks a runnable block"
        assert f"\n{b.target.removeprefix('make ')}:" in makefile, f"{b.where}: no Makefile target {b.target}"


def _run_in_order(tmp_path: Path, slow: bool) -> None:
    venv = installed_venv()
    if venv is None:
        pytest.skip("runs in the environment `make install` made (.venv/.installed)")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("copies the files git tracks: needs git and a clone")
    root = fresh_copy(tmp_path / "clone", venv)
    env = environment(root)
    skip = {s.strip() for s in os.environ.get("LORAEXPORT_DOC_SKIP", "").split(",") if s.strip()}
    runnable = [b for b in all_blocks() if b.kind in ("sh", "python") and (slow or not b.slow)]
    total = 0.0
    for block in runnable:
        if block.target is not None:
            print(f"elsewhere {block.where} ({block.target}, in its own environment)", flush=True)
            continue
        if skip & {line.split("#")[0].strip() for line in block.text.splitlines()}:
            print(f"skipped  {block.where} (LORAEXPORT_DOC_SKIP)", flush=True)
            continue
        ran = run_block(block, root, env, None if block.slow else FAST_TIMEOUT)
        total += ran.seconds
        print(f"{ran.seconds:7.1f} s  {block.where}{' (slow)' if block.slow else ''}", flush=True)
        assert ran.returncode == 0, (
            f"{block.where}: the block exits {ran.returncode}\n--- block\n{block.text}--- output (end)\n"
            + ran.output[-4000:]
        )
    print(f"{len(runnable)} blocks, {total:.1f} s", flush=True)


@pytest.mark.slow
def test_fast_blocks_run_in_order(tmp_path):
    _run_in_order(tmp_path, slow=False)


@pytest.mark.docs
@pytest.mark.skipif(os.environ.get("LORAEXPORT_DOC_BLOCKS_SLOW") != "1", reason="make test-docs")
def test_every_block_runs_in_order(tmp_path):
    _run_in_order(tmp_path, slow=True)
