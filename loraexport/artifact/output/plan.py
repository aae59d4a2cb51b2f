"""Where a command writes, checked before any work: never an input, never over what it did not write.

The path must name something (not ``.``, ``..``, ``/`` or a name the file system cannot hold),
its parent must be a writable folder, and it may never be, contain or sit inside any input,
compared after resolving links. An existing output is refused without ``force``; with it, only
a *previous output of loraexport* may be replaced (a folder holding ``loraexport.json``, an
empty folder, or a report written by ``verify --report``), never a link, a stray file or a
folder of the user's. Temporary folders that a killed run (``kill -9``) left beside the output
are removed once their process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loraexport.artifact.output.swap import Identity, identity
from loraexport.artifact.schema import META
from loraexport.errors import OutputExistsError, OutputNotWritableError, UsageError

MANIFEST = META
REPORT_HEADING = "# loraexport report"
TMP_SUFFIX_BYTES = len(".tmp-4194304-xxxxxxxx") + 1  # the leading dot of the temporary name
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
# A run's scratch folder beside its output (``scratch_prefix``): what, the boot, the process.
_SCRATCH = re.compile(r"^\.loraexport-[a-z0-9-]+?-(?P<boot>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}$")

PathLike = str | os.PathLike
Inputs = Mapping[str, "PathLike | Sequence[PathLike] | None"]


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
        n = len(os.fsencode(part.name)) + (TMP_SUFFIX_BYTES if part == p else 0)
        if n > name_max:
            raise UsageError(
                f"{label}: the name {short(part.name)!r} is too long: {len(os.fsencode(part.name))} bytes, "
                f"and this file system allows {name_max - (TMP_SUFFIX_BYTES if part == p else 0)}"
                + (" (leaving room for the temporary name beside it)" if part == p else "")
            )
    if len(os.fsencode(str(p))) + TMP_SUFFIX_BYTES >= path_max:
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


def same_or_under(a: Path, b: Path) -> bool:
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


def check_apart(out: Path, label: str, others: Inputs) -> None:
    """Two outputs of one run (``--junit`` and ``--report``'s two files, or ``--out``) may not be,
    contain or sit inside each other, links resolved (exit 2): the second would replace the first."""
    for name, value in others.items():
        for raw in _as_paths(value):
            other = Path(os.path.abspath(os.fspath(raw)))
            how = _overlap(Path(os.path.abspath(os.fspath(out))), other)
            if how:
                raise UsageError(
                    f"{label} {out} {how} the {name} {other}: two outputs of one run; choose another path"
                )


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
    if p.suffix.lower() == ".md":
        return head.startswith(REPORT_HEADING.encode())
    try:
        data = json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict) and isinstance(data.get("versions"), dict) and "loraexport" in data["versions"]
    )


def is_adapter_file(p: Path) -> bool:
    """An onnxruntime adapter file (``.onnx_adapter``: a flatbuffer whose identifier, bytes 4 to
    8, is ``TORT``), which convert-adapter may replace with --force."""
    if os.path.islink(p) or not os.path.isfile(p):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return p.suffix == ".onnx_adapter" and head[4:8] == b"TORT"


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
        proof = (
            f"it holds no {MANIFEST}"
            if plan.kind == "dir"
            else "it is no onnxruntime adapter file"
            if previous is is_adapter_file
            else "it is not a loraexport report"
        )
        raise OutputExistsError(
            f"{plan.label} {target} is a {what} loraexport did not write ({proof}); --force replaces "
            "only a previous output: remove it yourself or choose another path"
        )
    plan.replaces[target] = identity(target)


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


def boot_id() -> str:
    """This boot of the machine, 8 hex digits (Linux's ``boot_id``; zeros where there is none):
    a process id names a run only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            text = f.read(64).replace("-", "").strip()
    except OSError:
        return "0" * 8
    return text[:8] if re.fullmatch(r"[0-9a-f]{8}", text[:8]) else "0" * 8


def scratch_prefix(what: str) -> str:
    """The name a scratch folder of this run starts with: ``.loraexport-WHAT-BOOT-PID-``, so a later
    run can prove it stale (``remove_stale``): another boot, or a process that is gone."""
    return f".loraexport-{what}-{boot_id()}-{os.getpid()}-"


def _stale(name: str, target: Path | None) -> bool:
    """``name`` is a temporary folder of the output ``target`` (None: no output's) or a scratch
    folder, left by a run that is gone."""
    if m := _STALE.match(name):
        return target is not None and m["name"] == target.name and not _pid_alive(int(m["pid"]))
    if m := _SCRATCH.match(name):
        return m["boot"] != boot_id() or not _pid_alive(int(m["pid"]))
    return False


def remove_stale(target: Path | None, inputs: Inputs, parent: Path | None = None) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` beside ``target`` whose process is gone, and
    any run's scratch folder there (``.loraexport-*-BOOT-PID-*``) of another boot or a process
    that is gone: a run killed with SIGKILL cannot clean up after itself. Never one that is an
    input. ``parent`` instead of ``target``: every stale folder in it."""
    removed = []
    parent = target.parent if parent is None else parent
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        if not _stale(e.name, target):
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
    paths: Sequence[PathLike],
    *,
    force: bool = False,
    inputs: Inputs | None = None,
    label: str = "--report",
    previous: Callable[[Path], bool] | None = None,
) -> OutputPlan:
    """Check output files (``verify --report FILE`` writes FILE and FILE.md) before any work.
    ``previous``: what counts as a file loraexport wrote, which ``force`` may replace (default:
    a report)."""
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
        _plan_existing(plan, p, force, previous or _is_previous_report)
    plan.removed_stale = [q for p in targets for q in remove_stale(p, inputs or {})]
    return plan
