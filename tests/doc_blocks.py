"""The command blocks of README.md and docs/*.md, and a fresh copy of the repository to run them in.

A fenced block's info string says what it is: ``sh`` (run with bash, every command checked),
``python`` (run with the virtual environment's python) or ``text`` (an illustration: not run).
A line ``<!-- slow -->`` just before the fence marks a block that runs only under
``make test-docs`` (real models, the benchmarks, ``make demo``, the test suite itself). A line
``<!-- make TARGET -->`` just before the fence marks a block that needs an environment of its
own, which that target makes and runs it in (docs/runtime.md's Optimum block: ``make
test-optimum``); the other runs of blocks leave it out.

Blocks run in reading order: README.md first, then the docs/*.md files in the order README.md
links them, each file's blocks top to bottom, all in one copy of the repository (the files git
tracks, or would track, as they are in the working tree), from its root, with the virtual
environment on PATH (README: ``. .venv/bin/activate``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNABLE = {"sh", "python"}
KINDS = RUNNABLE | {"text"}
SLOW = "<!-- slow -->"
OWN_TARGET = re.compile(r"^<!-- (make [\w-]+) -->$")
FENCE = re.compile(r"^(`{3,})(.*)$")
DOC_LINK = re.compile(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)")
STAMP = ".installed"  # the Makefile's: .venv/.installed
NESTED = "LORAEXPORT_DOC_BLOCKS"  # set for the blocks: a block running `make test` skips these tests


@dataclass
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    kind: str
    slow: bool
    text: str
    target: str | None = None  # the make target that alone runs it, in its own environment

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (an unclosed fence is an error)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(REPO).as_posix()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{rel}:{i + 1}: a code fence that is never closed")
        before = lines[i - 1].strip() if i > 0 else ""
        target = OWN_TARGET.match(before)
        text = "\n".join(lines[i + 1 : end]) + "\n"
        out.append(Block(rel, i + 1, info, before == SLOW, text, target and target.group(1)))
        i = end + 1
    return out


def documents() -> list[Path]:
    """README.md, then each docs/*.md in the order README.md first links it."""
    readme = REPO / "README.md"
    linked = list(dict.fromkeys(DOC_LINK.findall(readme.read_text(encoding="utf-8"))))
    return [readme, *(REPO / d for d in linked)]


def all_blocks() -> list[Block]:
    return [b for doc in documents() for b in blocks_of(doc)]


def tracked_files(repo: Path) -> list[str]:
    """What a clone would hold: tracked files and untracked ones git does not ignore."""
    res = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    )
    return [f for f in res.stdout.decode().split("\0") if f and (repo / f).is_file()]


def installed_venv() -> Path | None:
    """The environment running this, when the Makefile installed it (its stamp file is there)."""
    venv = Path(sys.prefix)
    return venv if venv != Path(sys.base_prefix) and (venv / STAMP).is_file() else None


def fresh_copy(dest: Path, venv: Path) -> Path:
    """A copy of the repository's files in ``dest``, as a clone would have them, with ``.venv``
    a link to ``venv``. The copy's ``pyproject.toml`` is dated before the environment's stamp, so
    that the Makefile's targets find it installed and never install into it."""
    for f in tracked_files(REPO):
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, target)
    (dest / ".venv").symlink_to(venv, target_is_directory=True)
    stamp = (venv / STAMP).stat().st_mtime - 1
    os.utime(dest / "pyproject.toml", (stamp, stamp))
    return dest


def environment(root: Path) -> dict[str, str]:
    """The shell of a reader who ran ``. .venv/bin/activate``; the copy's own code first on the
    path (the environment's editable install points at the repository it was made from)."""
    env = dict(os.environ)
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["MPLBACKEND"] = "Agg"
    env[NESTED] = "1"
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_CURRENT_TEST"):
        env.pop(var, None)
    return env


@dataclass
class Ran:
    block: Block
    seconds: float
    returncode: int
    output: str


def run_block(block: Block, root: Path, env: dict[str, str], timeout: float | None) -> Ran:
    script = root / ".doc-block"
    script.write_text(block.text, encoding="utf-8")
    cmd = ["bash", "-euo", "pipefail", str(script)] if block.kind == "sh" else ["python", str(script)]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout
        )
        code, output = res.returncode, res.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:
        code, output = -1, (e.output or b"").decode(errors="replace") + f"\n[timed out after {timeout} s]"
    finally:
        script.unlink(missing_ok=True)
    return Ran(block, time.perf_counter() - t0, code, output)
