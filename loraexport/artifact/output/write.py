"""Writing an output: a temporary folder beside it, cleaned up on any failure, moved in at the end.

The temporary folder (``.NAME.tmp-PID-XXXXXXXX``) is created with ``os.mkdir``, so the output
gets the permissions any folder the user creates gets (mkdtemp's would be 0700); parent folders
the run creates are removed again if it fails. A signal that arrives during the final move is
held back and delivered right after it; the exception then carries ``loraexport_written``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from loraexport.artifact.output import swap
from loraexport.artifact.output.plan import OutputPlan, same_or_under
from loraexport.errors import InputNotFoundError, OutputNotWritableError, UsageError


def _make_parents(p: Path) -> list[Path]:
    """Create the missing folders above ``p`` (with the user's umask); return them, outermost first."""
    missing = [a for a in reversed(p.parents) if not os.path.lexists(a)]
    made = []
    try:
        for a in missing:
            os.mkdir(a)
            made.append(a)
    except OSError:
        _remove_parents(made)
        raise
    return made


def _remove_parents(made: list[Path]) -> None:
    for a in reversed(made):
        try:
            os.rmdir(a)
        except OSError:
            break


def _make_tmp(target: Path) -> Path:
    """An empty folder beside ``target`` named for this process; ``os.mkdir`` applies the umask,
    so the output gets the permissions any folder the user creates gets (mkdtemp's are 0700)."""
    while True:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _the_outputs(path: Path, plan: OutputPlan, tmp: Path | None) -> bool:
    """``path`` is in the temporary folder or a target, or is the folder they are written in:
    a permission error there is the output's, anywhere else an input's."""
    p = Path(os.path.abspath(path))
    return p == plan.path.parent or any(same_or_under(p, q) for q in (*plan.targets, *([tmp] if tmp else [])))


@contextlib.contextmanager
def _writing(plan: OutputPlan, hasher=None) -> Iterator[tuple[Path, list[Path]]]:
    """The temporary folder, with cleanup and error translation shared by both writers."""
    target = plan.path
    made: list[Path] = []
    tmp: Path | None = None
    written: list[bool] = [False]
    try:
        made = _make_parents(target)
        tmp = _make_tmp(target)
        yield tmp, made
        written[0] = True
    except OSError as e:
        if hasher:
            hasher.cancel()
        _cleanup(tmp, made)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputNotWritableError(f"no space left on device while writing {target}") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            name = e.filename if isinstance(e.filename, str) else None
            if name and not _the_outputs(Path(name), plan, tmp):
                raise InputNotFoundError(f"cannot read {name}: {e.strerror}") from e  # an input's fault
            raise OutputNotWritableError(f"cannot write {target}: {e.strerror}") from e
        if e.errno == errno.ENAMETOOLONG:
            raise UsageError(f"{plan.label} {target}: a name is too long for this file system") from e
        raise
    except BaseException:
        if hasher:
            hasher.cancel()
        _cleanup(tmp, made)
        raise


def _cleanup(tmp: Path | None, made: list[Path]) -> None:
    if tmp is not None:
        swap.remove(tmp)
    _remove_parents(made)


@contextlib.contextmanager
def write_output(plan: OutputPlan, hasher=None, meta: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success write its ``loraexport.json`` (``meta``, which the
    caller may fill while it works, and the sha256 of every file) and move it to ``plan.path``.

    On any exception (Ctrl-C and signals included) the temporary folder and any parent folder
    this run created are removed, and whatever was at ``plan.path`` is left exactly as it was.
    A signal that arrives during the swap is delivered right after it; the exception then
    carries ``loraexport_written`` (the output is complete).
    """
    from loraexport.artifact import provenance

    target = plan.path
    with _writing(plan, hasher) as (tmp, _made):
        done = False
        try:
            yield tmp
            provenance.write(tmp, meta, hasher.digests() if hasher else None)
            with swap.signals_deferred():  # so that "written" is true exactly when the output is there
                swap.swap_in(tmp, target, plan.replaces.get(target), plan.label)
                done = True
        except BaseException as e:
            if done:  # a signal held back during the swap arrived once it was done
                e.loraexport_written = str(target)
            raise


def write_files(plan: OutputPlan, contents: Mapping[Path, str | bytes]) -> None:
    """Write each of ``plan.targets`` (given in ``contents``) beside it, then move them in."""
    with _writing(plan) as (tmp, _made):
        for target in plan.targets:
            data = contents[target]
            (tmp / target.name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        with swap.signals_deferred():
            for target in plan.targets:
                swap.swap_in(tmp / target.name, target, plan.replaces.get(target), plan.label)
        os.rmdir(tmp)


def dir_mode(path: Path) -> int:
    """The permission bits of ``path`` (for tests and messages)."""
    return stat.S_IMODE(os.stat(path).st_mode)
