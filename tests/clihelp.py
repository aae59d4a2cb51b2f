"""Shared by the CLI tests: run the CLI in-process or as the real program, assert the one-line
contract (of the CLI's stderr, and of a library error's message), and prove that a folder was
left exactly as it was.

- ``run`` (in-process, click's runner) and ``program`` (the console script as a real process;
  ``peak_rss_mb`` measures one), both with ``--quiet`` unless told otherwise;
- ``ok`` (exit 0), ``refused`` (an ``error: `` line and its exit code), ``one_line`` (any
  other single line: ``interrupted: nothing was written``, ``internal error: ...``),
  ``one_line_message`` (a library exception's message);
- ``snapshot`` and ``untouched`` (every file, folder and link under a folder, before and
  after), ``previous_output`` (a folder as loraexport leaves it), ``nothing_left`` and
  ``leftovers`` (no output and no temporary folder beside it);
- ``sitecustomize`` (code injected into the console script at start-up) and ``signalled``
  (a real signal while the merge is writing its output).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from loraexport.cli import main

BIN = Path(sys.executable).parent / "loraexport"
# The installed console script, else the module (for the tests that do not need the script itself).
COMMAND = [str(BIN)] if BIN.is_file() else [sys.executable, "-m", "loraexport.cli"]
needs_bin = pytest.mark.skipif(not BIN.exists(), reason="the console script is not installed")
QUICK = ("--no-latency", "--samples", "2", "--threads", "1")  # verify without timing, on two parity cases,
# one thread: two test workers share the two cores (spinning OpenMP threads slow both down 10x)


def _argv(args: tuple[object, ...], quiet: bool) -> list[str]:
    return ["--quiet"] * quiet + [str(a) for a in args]


def run(*args: object, quiet: bool = True, catch_exceptions: bool = True) -> Result:
    """``loraexport [--quiet] ARGS`` in-process (click's runner; stderr apart from stdout).
    ``catch_exceptions=False``: an exception that escapes the CLI fails the test where it is."""
    return CliRunner().invoke(main, _argv(args, quiet), catch_exceptions=catch_exceptions)


def program(
    *args: object, env: dict | None = None, timeout: float = 300, quiet: bool = True, **kw
) -> subprocess.CompletedProcess:
    """The installed console script as a real process (signals, fd-level output, memory)."""
    return subprocess.run(
        [*COMMAND, *_argv(args, quiet)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
        **kw,
    )


def _code(r: Result | subprocess.CompletedProcess) -> int:
    return r.exit_code if isinstance(r, Result) else r.returncode


def ok(r: Result | subprocess.CompletedProcess) -> Result | subprocess.CompletedProcess:
    """Exit 0 (else the test fails showing stderr and any escaped exception); returns ``r``."""
    assert _code(r) == 0, (_code(r), r.stderr, getattr(r, "exception", None))
    return r


def one_line(
    r: Result | subprocess.CompletedProcess, code: int, start: str, *needles: str, printed: bool = False
) -> str:
    """Exit ``code``, exactly one line on stderr starting with ``start`` and naming every
    needle, no traceback, no exception escaped the CLI, and nothing on stdout unless
    ``printed`` (a failed verification prints its result there). Returns the line."""
    rc, out, err = _code(r), r.stdout, r.stderr
    assert rc == code, (rc, out, err, getattr(r, "exception", None))
    if isinstance(r, Result):
        assert isinstance(r.exception, SystemExit), r.exception
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert "Traceback" not in out + err
    assert printed or out == "", out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused(r: Result | subprocess.CompletedProcess, code: int, *needles: str, printed: bool = False) -> str:
    """``one_line`` for an error: exit ``code`` and one ``error: `` line naming every needle."""
    return one_line(r, code, "error: ", *needles, printed=printed)


def one_line_message(e: pytest.ExceptionInfo, *needles: str) -> str:
    """The library's half of the contract: the exception's message is one line (the CLI prints
    it as it is) naming every needle. Returns the message."""
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---- folders left as they were -----------------------------------------------------------------
def snapshot(root: Path, digests: bool = True) -> dict[str, tuple]:
    """Every file (size, mtime, mode, sha256), folder and link under ``root``: what 'untouched'
    means. ``digests=False`` leaves out the sha256 (for sparse files of gigabytes)."""
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
            digest = ""
            if digests:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            snap[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return snap


@contextlib.contextmanager
def untouched(root: Path, digests: bool = True) -> Iterator[None]:
    """Everything under ``root`` is as it was once the block is done (see ``snapshot``)."""
    before = snapshot(root, digests)
    yield
    assert snapshot(root, digests) == before


def previous_output(path: Path, *files: str) -> Path:
    """A folder as loraexport leaves it (its files and ``loraexport.json``): what ``--force``
    may replace. Each file holds its own name."""
    path.mkdir()
    for f in files:
        (path / f).write_text(f)
    (path / "loraexport.json").write_text("{}")
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    """What a run to ``parent/name`` may leave beside it: ``.NAME.tmp-PID-…`` folders."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def nothing_left(out: Path) -> None:
    """No output at ``out`` and no temporary folder beside it."""
    assert not out.exists()
    assert leftovers(out.parent, out.name) == []


# ---- the real process: code injected at start-up, real signals -----------------------------------
def sitecustomize(hook: Path, source: str) -> dict[str, str]:
    """``hook/sitecustomize.py`` holding ``source``, and the environment that makes the console
    script run it at start-up (``program(..., env=...)``)."""
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": str(hook)}


# The merge says READY at its first progress update (its output half written), then waits in
# short sleeps: a signal that lands before a long sleep() starts would be noticed only when it
# ends (Python runs handlers between bytecodes, and a busy machine may deliver the signal while
# the child is still between its flush and the sleep), so one 60 s sleep made the test flaky.
SLOW_MERGE = (
    "import sys, time\nfrom loraexport.core import progress\n"
    "def update(self, n=1, **kw):\n    sys.stderr.write('READY\\n'); sys.stderr.flush()\n"
    "    for _ in range(600):\n        time.sleep(0.1)\n"
    "progress.Progress.update = update\n"
)


def _as_from_a_terminal() -> None:
    """In the child: the signal state a command typed at a terminal starts with. A test run
    started in the background (``make test &``, ``nohup``) has SIGINT ignored, as POSIX shells
    do for background jobs, and its children would inherit that: Python then installs no
    KeyboardInterrupt handler, and a Ctrl-C (which such a job can never get) would be ignored."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def signalled(hook: Path, sig: int, *args: object) -> subprocess.CompletedProcess:
    """``loraexport --quiet ARGS`` (a merge) as a real process, sent ``sig`` once it is writing
    its output (``SLOW_MERGE``, injected through ``hook``)."""
    env = dict(os.environ, **sitecustomize(hook, SLOW_MERGE))
    argv = [*COMMAND, *_argv(args, True)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 120)  # start-up imports torch: seconds
        assert ready and proc.stderr.readline().strip() == "READY"  # the output is half written now
        time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


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
        [sys.executable, "-c", wrapper, *COMMAND, *_argv(args, True)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    err, _, kb = r.stderr.rpartition(RSS_MARK)
    r.stderr = err[:-1] if err.endswith("\n") else err
    return r, int(kb) / 1024
