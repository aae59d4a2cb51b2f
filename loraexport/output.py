"""Outputs that never harm an input: one place checks every output path and owns the swap.

Every command that writes plans its output first (``plan_output``, ``plan_files``), before any
work: the path must name something (not ``.``, ``..``, ``/`` or a name the file system cannot
hold), its parent must be a writable folder, and it may never be, contain or sit inside any
input, compared after resolving links. An existing output is refused without ``force``; with
it, only a *previous output of loraexport* may be replaced (a folder holding
``loraexport.json``, an empty folder, or a report written by ``verify --report``), never a link,
a stray file or a folder of the user's.

The work is written into a temporary folder beside the output (``.NAME.tmp-PID-XXXXXXXX``),
created with the permissions any folder the user creates gets, and moved into place only when
complete (``write_output``, ``write_files``). The final move is one atomic ``renameat2`` on
Linux: ``RENAME_NOREPLACE`` when nothing was there, so a folder that appeared meanwhile (another
run, another program) is never removed and this run fails instead (exit 3); ``RENAME_EXCHANGE``
when replacing, after which what was swapped out is removed only if it is the very entry
(device, inode and change time) that was planned to be replaced. Temporary folders left by a killed run
(``kill -9``) are removed by the next run to the same output once their process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraexport.errors import (
    InputNotFoundError,
    OutputExistsError,
    OutputNotWritableError,
    OutputTakenError,
    UsageError,
)

MANIFEST = "loraexport.json"
REPORT_HEADING = "# loraexport report"
_TMP_SUFFIX_BYTES = len(".tmp-4194304-xxxxxxxx") + 1  # the leading dot of the temporary name
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# Held back while the output is swapped in, and delivered right after (SIGHUP: a closed terminal).
DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())

PathLike = str | os.PathLike
Inputs = Mapping[str, "PathLike | Sequence[PathLike] | None"]
# (st_dev, st_ino, st_ctime_ns): inode numbers are reused at once on ext4, and the change time
# moves whenever anything is added to, removed from or renamed in the folder.
Identity = tuple[int, int, int]


@dataclass
class OutputPlan:
    """Where one command writes, checked before any work; ``write_output``/``write_files`` use it.

    ``targets`` are the final paths (one folder, or a few files such as report.json + .md);
    ``replaces`` maps each existing target that ``force`` allows replacing to its identity.
    """

    label: str  # the option that named it, for messages: "--out", "--report"
    targets: list[Path]
    kind: str  # "dir" or "files"
    replaces: dict[Path, Identity] = field(default_factory=dict)
    removed_stale: list[Path] = field(default_factory=list)  # temporary folders of dead runs

    @property
    def path(self) -> Path:
        return self.targets[0]


# ---- checks --------------------------------------------------------------------------------------
def _absolute(p: PathLike, label: str) -> Path:
    try:
        text = os.fspath(p)
    except TypeError as e:
        raise UsageError(f"{label} must be a path, got {type(p).__name__}") from e
    if "\x00" in str(text):
        raise UsageError(f"{label} {text!r} contains a NUL byte")
    if str(text) == "":
        raise UsageError(f"{label} is empty: give the path of the output to write")
    return Path(os.path.abspath(text))


def _check_name(given: PathLike, p: Path, label: str) -> None:
    raw = Path(os.fspath(given))
    if raw.name in ("", ".", "..") or p == Path(p.anchor):
        raise UsageError(
            f"{label} {os.fspath(given)!r} does not name a new folder or file (give e.g. {label} runs/out)"
        )


def _nearest_existing(p: Path) -> Path:
    anc = p.parent
    while not os.path.lexists(anc):
        anc = anc.parent
    return anc


def _check_lengths(p: Path, label: str, anchor: Path) -> None:
    """Every component the run will create (and the temporary name beside the last) must fit
    the file system's limit; the whole path must fit PATH_MAX."""
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    created = [p] + [a for a in p.parents if not os.path.lexists(a)]
    for part in created:
        n = len(os.fsencode(part.name)) + (_TMP_SUFFIX_BYTES if part == p else 0)
        if n > name_max:
            raise UsageError(
                f"{label}: the name {short(part.name)!r} is too long: {len(os.fsencode(part.name))} bytes, "
                f"and this file system allows {name_max - (_TMP_SUFFIX_BYTES if part == p else 0)}"
                + (" (leaving room for the temporary name beside it)" if part == p else "")
            )
    if len(os.fsencode(str(p))) + _TMP_SUFFIX_BYTES >= path_max:
        raise UsageError(f"{label}: the path is too long for this file system ({path_max} bytes at most)")


def short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_parent(p: Path, label: str) -> Path:
    anchor = _nearest_existing(p)
    if not os.path.isdir(anchor):
        raise OutputNotWritableError(f"{label} {p} cannot be created: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write to {anchor} (permission denied)")
    return anchor


def _as_paths(value: PathLike | Sequence[PathLike] | None) -> list[PathLike]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return [v for v in value if v is not None]


def _forms(p: Path) -> list[Path]:
    """The path as given (made absolute) and with every link resolved."""
    real = Path(os.path.realpath(p))
    return [p] if real == p else [p, real]


def _same_or_under(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def _overlap(out: Path, given: Path) -> str | None:
    for o in _forms(out):
        for i in _forms(given):
            if o == i:
                return "is"
            if o in i.parents:
                return "contains"
            if i in o.parents:
                return "sits inside"
    with contextlib.suppress(OSError, ValueError):  # bind mounts, case-insensitive names: one inode
        ino = os.stat(given)
        for o in [out, *out.parents]:
            if os.path.exists(o) and os.path.samestat(os.stat(o), ino):
                return "is" if o == out else "sits inside"
        st = os.stat(out)
        if any(os.path.samestat(os.stat(a), st) for a in Path(os.path.realpath(given)).parents):
            return "contains"
    return None


def check_not_input(out: Path, label: str, inputs: Inputs) -> None:
    """An output may never be, contain or sit inside any input, after resolving links (exit 2)."""
    for name, value in inputs.items():
        for raw in _as_paths(value):
            given = Path(os.path.abspath(os.fspath(raw)))
            how = _overlap(out, given)
            if how:
                raise UsageError(
                    f"{label} {out} {how} the {name} {given}: an output may never be, contain or sit "
                    "inside an input; choose another output path"
                )


def _identity(p: Path) -> Identity:
    st = os.lstat(p)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _is_previous_output_dir(p: Path) -> bool:
    """A folder loraexport wrote (it holds loraexport.json, not as a link) or an empty one."""
    if os.path.islink(p) or not os.path.isdir(p):
        return False
    try:
        with os.scandir(p) as it:
            names = [e.name for e in it]
    except OSError:
        return False
    manifest = p / MANIFEST
    return not names or (MANIFEST in names and os.path.isfile(manifest) and not os.path.islink(manifest))


def _is_previous_report(p: Path) -> bool:
    """A report.json (a JSON object with versions.loraexport) or report.md that verify wrote."""
    if os.path.islink(p) or not os.path.isfile(p):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(8 * 1024 * 1024 + 1)
    except OSError:
        return False
    if p.suffix == ".md":
        return head.startswith(REPORT_HEADING.encode())
    try:
        data = json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("versions"), dict) and "loraexport" in data["versions"]
    )


def _plan_existing(plan: OutputPlan, target: Path, force: bool, previous: Callable[[Path], bool]) -> None:
    if not os.path.lexists(target):
        return
    if not force:
        raise OutputExistsError(f"output exists: {target} (pass --force to replace it)")
    if os.path.islink(target):
        raise OutputExistsError(
            f"{plan.label} {target} is a symbolic link; --force replaces only a previous output, "
            "not a link: give the folder itself or another path"
        )
    if not previous(target):
        what = "folder" if os.path.isdir(target) else "file"
        proof = f"it holds no {MANIFEST}" if plan.kind == "dir" else "it is not a loraexport report"
        raise OutputExistsError(
            f"{plan.label} {target} is a {what} loraexport did not write ({proof}); --force replaces "
            "only a previous output: remove it yourself or choose another path"
        )
    plan.replaces[target] = _identity(target)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process: not ours to judge
    return True


def remove_stale(target: Path, inputs: Inputs) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` beside ``target`` whose process is gone
    (a run killed with SIGKILL cannot clean up after itself); never one that is an input."""
    removed = []
    parent = target.parent
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = _STALE.match(e.name)
        if not m or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        p = parent / e.name
        try:
            check_not_input(p, "stale", inputs)
        except UsageError:
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not os.path.lexists(p):
            removed.append(p)
    return removed


def plan_output(
    path: PathLike, *, force: bool = False, inputs: Inputs | None = None, label: str = "--out"
) -> OutputPlan:
    """Check an output folder before any work (see the module docstring); raises
    ``UsageError`` (exit 2) for a path that cannot name an output or overlaps an input,
    ``OutputExistsError``/``OutputNotWritableError`` (exit 3) otherwise."""
    p = _absolute(path, label)
    _check_name(path, p, label)
    anchor = _check_parent(p, label)
    _check_lengths(p, label, anchor)
    check_not_input(p, label, inputs or {})
    plan = OutputPlan(label, [p], "dir")
    _plan_existing(plan, p, force, _is_previous_output_dir)
    plan.removed_stale = remove_stale(p, inputs or {})
    return plan


def plan_files(
    paths: Sequence[PathLike], *, force: bool = False, inputs: Inputs | None = None, label: str = "--report"
) -> OutputPlan:
    """Check output files (``verify --report FILE`` writes FILE and FILE.md) before any work."""
    targets = []
    for path in paths:
        p = _absolute(path, label)
        _check_name(path, p, label)
        anchor = _check_parent(p, label)
        _check_lengths(p, label, anchor)
        check_not_input(p, label, inputs or {})
        targets.append(p)
    plan = OutputPlan(label, targets, "files")
    for p in targets:
        if os.path.isdir(p) and not os.path.islink(p):
            raise OutputExistsError(f"{label} {p} is a folder; give the path of a file to write")
        _plan_existing(plan, p, force, _is_previous_report)
    plan.removed_stale = [q for p in targets for q in remove_stale(p, inputs or {})]
    return plan


# ---- the swap ------------------------------------------------------------------------------------
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _libc_renameat2() if os.uname().sysname == "Linux" else None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, failing with ``FileExistsError`` if anything is at ``dst``."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from e
        raise
    if os.path.lexists(dst):  # no renameat2 here: a narrow window remains between check and rename
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def _remove(p: Path) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _taken(label: str, target: Path) -> OutputTakenError:
    return OutputTakenError(
        f"{label} {target} was created or replaced by someone else while this run worked; "
        "it was left alone and this run's output discarded"
    )


def _swap_in(new: Path, target: Path, replaces: Identity | None, label: str) -> None:
    """Put ``new`` at ``target``: where nothing was planned to be replaced, only if nothing is
    there; else only if what is there is still the entry planned (its identity)."""
    if replaces is None or not os.path.lexists(target):
        try:
            rename_noreplace(new, target)
        except FileExistsError as e:
            raise _taken(label, target) from e
        return
    if _identity(target) != replaces:  # changed since it was planned: not what we were told to replace
        raise _taken(label, target)
    try:
        exchanged = _renameat2(new, target, _RENAME_EXCHANGE)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        exchanged = False
    if exchanged:  # ``new`` now names the previous entry (a rename moves its change time: not compared)
        if _identity(new)[:2] != replaces[:2]:
            _renameat2(new, target, _RENAME_EXCHANGE)  # put the stranger back
            raise _taken(label, target)
        _remove(new)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    if _identity(old)[:2] != replaces[:2]:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)
        raise _taken(label, target)
    try:
        rename_noreplace(new, target)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, target)
        raise
    _remove(old)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done (they are delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not on POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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
    return p == plan.path.parent or any(
        _same_or_under(p, q) for q in (*plan.targets, *([tmp] if tmp else []))
    )


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
        _remove(tmp)
    _remove_parents(made)


@contextlib.contextmanager
def write_output(plan: OutputPlan, hasher=None) -> Iterator[Path]:
    """Yield a temporary folder; on success add its manifest and move it to ``plan.path``.

    On any exception (Ctrl-C and signals included) the temporary folder and any parent folder
    this run created are removed, and whatever was at ``plan.path`` is left exactly as it was.
    A signal that arrives during the swap is delivered right after it; the exception then
    carries ``loraexport_written`` (the output is complete).
    """
    from loraexport.manifest import write_manifest

    target = plan.path
    with _writing(plan, hasher) as (tmp, _made):
        done = False
        try:
            yield tmp
            write_manifest(tmp, hasher.digests() if hasher else None)
            with signals_deferred():  # so that "written" is true exactly when the output is there
                _swap_in(tmp, target, plan.replaces.get(target), plan.label)
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
        with signals_deferred():
            for target in plan.targets:
                _swap_in(tmp / target.name, target, plan.replaces.get(target), plan.label)
        os.rmdir(tmp)


def dir_mode(path: Path) -> int:
    """The permission bits of ``path`` (for tests and messages)."""
    return stat.S_IMODE(os.stat(path).st_mode)
