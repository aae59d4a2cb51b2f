"""Shared by the CLI tests: run the CLI in-process or as the real program, assert the one-line
error contract, and snapshot a folder to prove nothing in it changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from loraexport.cli import main

BIN = Path(sys.executable).parent / "loraexport"


def run(*args: object) -> Result:
    """``loraexport --quiet ARGS`` in-process (click's runner; stderr apart from stdout)."""
    return CliRunner().invoke(main, ["--quiet", *(str(a) for a in args)])


def program(
    *args: object, env: dict | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """The installed console script as a real process (signals, fd-level output, memory)."""
    return subprocess.run(
        [str(BIN), "--quiet", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        **kw,
    )


def refused(r: Result | subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one line on stderr starting with ``error: `` and naming every
    needle, nothing on stdout, no traceback, no exception escaped the CLI."""
    rc = r.exit_code if isinstance(r, Result) else r.returncode
    out = r.stdout
    err = r.stderr
    assert rc == code, (rc, out, err, getattr(r, "exception", None))
    if isinstance(r, Result):
        assert isinstance(r.exception, SystemExit), r.exception
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err and out == ""
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, mtime, mode, sha256), folder and link under ``root``: what 'untouched' means."""
    snap: dict[str, tuple] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            p = os.path.join(d, name)
            snap[os.path.relpath(p, root) + "/"] = ("link", os.readlink(p)) if os.path.islink(p) else ()
        for name in files:
            p = os.path.join(d, name)
            if os.path.islink(p):
                snap[os.path.relpath(p, root)] = ("link", os.readlink(p))
                continue
            st = os.stat(p)
            with open(p, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            snap[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return snap


RSS_MARK = "peak-rss-kb="


def peak_rss_mb(*args: object, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run the console script under a fresh wrapper process and return (result, its peak RSS in
    MB): ``RUSAGE_CHILDREN`` of a wrapper whose only child is the command. The wrapper's own
    line is taken off stderr, so the result is the command's own."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        f"sys.stderr.write('\\n{RSS_MARK}%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(r.returncode)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", wrapper, str(BIN), "--quiet", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    err, _, kb = r.stderr.rpartition(RSS_MARK)
    r.stderr = err[:-1] if err.endswith("\n") else err
    return r, int(kb) / 1024
