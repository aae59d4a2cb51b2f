"""Issue 7's catalogue of bad inputs and faults, through the CLI: each is refused with its exit code
and one line naming what is wrong, no traceback, and the output location exactly as it was.

test_cli_errors.py covers `train`'s inputs; this file covers adapters, checkpoints and outputs for
`merge` (the streaming merge) and `merge-and-export` (the in-memory merge), which read them by
different code. A snapshot of the whole temporary folder (inputs and output location, sizes,
times and digests) is taken before each run and compared after it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from artifacts import copy_dir, edit_json, edit_tensors, to_pickle
from click.testing import Result
from clihelp import needs_bin, ok, one_line, previous_output, refused, run, signalled, untouched
from safetensors.torch import load_file

from loraexport.lora.adapter import CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME

COMMANDS = ["merge", "merge-and-export"]  # the streaming and the in-memory merge
Q0 = "decoder.0.self_attn.q"
V1 = "decoder.1.self_attn.v"


def _merge(command: str, base: Path, adapter: Path, out: Path, *extra: str) -> Result:
    if command == "merge":
        return run("merge", "--base", base, "--adapter", adapter, "--out", out, *extra)
    return run("merge-and-export", "--base", base, "--adapter", adapter, "--out", out, "--no-verify", *extra)


@pytest.fixture
def work(tmp_path, causal_base, causal_adapter) -> Path:
    """tmp_path/base and tmp_path/adapter: copies the test may break; tmp_path/out: the output."""
    copy_dir(causal_base, tmp_path / "base")
    copy_dir(causal_adapter, tmp_path / "adapter")
    return tmp_path


def _merge_refused(work: Path, command: str, code: int, *needles: str, adapter: Path | None = None) -> str:
    with untouched(work):
        return refused(
            _merge(command, work / "base", adapter or work / "adapter", work / "out"), code, *needles
        )


def _deny(monkeypatch, path: Path) -> None:
    """Make ``path`` unreadable: chmod, and (root ignores modes) the access check loraexport makes."""
    path.chmod(0)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if Path(p) == path else real(p, mode, **kw)
        )


# ---- missing or unreadable paths ----------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("which", ["base", "adapter"])
def test_missing_path_is_named(work, command, which):
    missing = work / f"no-such-{which}"
    with untouched(work):
        paths = {"base": work / "base", "adapter": work / "adapter", which: missing}
        r = _merge(command, paths["base"], paths["adapter"], work / "out")
        refused(r, 3, "not found", str(missing))


@pytest.mark.parametrize("command", COMMANDS)
def test_unreadable_adapter_directory(work, command, monkeypatch):
    _deny(monkeypatch, work / "adapter")
    try:
        _merge_refused(work, command, 3, "not readable", str(work / "adapter"))
    finally:
        (work / "adapter").chmod(0o755)


@pytest.mark.parametrize("command", COMMANDS)
def test_unreadable_adapter_config(work, command, monkeypatch):
    config = work / "adapter" / CONFIG_NAME
    config.chmod(0)
    import loraexport.core.untrusted

    def denied(file, *args, **kwargs):  # root reads a mode-000 file anyway: fail as for a user
        if Path(file) == config:
            raise PermissionError(errno.EACCES, "Permission denied")
        return open(file, *args, **kwargs)

    monkeypatch.setattr(loraexport.core.untrusted, "open", denied, raising=False)  # where JSON is read
    try:
        _merge_refused(work, command, 3, str(config), "Permission denied")
    finally:
        config.chmod(0o644)


def test_path_too_long_is_invalid_input(work):
    long = work / ("x" * 300)
    refused(_merge("merge", work / "base", long, work / "out"), 3, "File name too long")


# ---- truncated and corrupted safetensors --------------------------------------------------------
def _with_offsets_out_of_range(raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b, e + 4096]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


CORRUPTIONS = {
    "header-length-past-the-end": lambda raw: struct.pack("<Q", len(raw)) + raw[8:],
    "header-not-json": lambda raw: raw[:8] + b"#" + raw[9:],
    "offsets-out-of-range": _with_offsets_out_of_range,
    "truncated": lambda raw: raw[: len(raw) - 7],
    "empty": lambda raw: b"",
}
# What our own header reader (the streaming merge of the base) says about each.
REASONS = {
    "header-length-past-the-end": "runs past the end of the file",
    "header-not-json": "not valid JSON",
    "offsets-out-of-range": "out of range",
    "truncated": "out of range",
    "empty": "too short",
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_adapter_safetensors(work, command, corruption):
    path = work / "adapter" / WEIGHTS_NAME
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    _merge_refused(work, command, 3, str(path), "safetensors")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_base_safetensors(work, command, corruption):
    path = work / "base" / "model.safetensors"
    path.write_bytes(CORRUPTIONS[corruption](path.read_bytes()))
    line = _merge_refused(work, command, 3, str(path))
    if command == "merge":
        assert REASONS[corruption] in line, line


# ---- adapter_config.json ------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_config_missing(work, command):
    (work / "adapter" / CONFIG_NAME).unlink()
    _merge_refused(work, command, 3, f"{CONFIG_NAME} not found", str(work / "adapter"))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    "text", ['{"r": 4,', "", "\xff\xfe{}", "[" * 100_000], ids=["cut", "empty", "utf16", "deep"]
)
def test_adapter_config_not_json(work, command, text):
    (work / "adapter" / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    _merge_refused(work, command, 3, CONFIG_NAME, "not valid JSON")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", "4"),
        ("r", 4.0),
        ("lora_alpha", None),
        ("lora_alpha", math.inf),
        ("target_modules", 3),
        ("use_rslora", "yes"),
        ("rank_pattern", {"q": "2"}),
        ("layers_pattern", "(decoder"),
    ],
)
def test_adapter_config_wrong_types(work, command, key, value):
    edit_json(work / "adapter" / CONFIG_NAME, **{key: value})
    _merge_refused(work, command, 3, CONFIG_NAME, repr(key))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("peft_type", ["IA3", "LOHA", "ADALORA", None])
def test_adapter_config_unknown_peft_type(work, command, peft_type):
    edit_json(work / "adapter" / CONFIG_NAME, peft_type=peft_type)
    _merge_refused(work, command, 3, "peft_type", repr(peft_type))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("alora_invocation_tokens", [5, 6], "aLoRA"),
        ("lora_bias", True, "LoRA bias"),
        ("use_qalora", True, "QALoRA"),
        ("layer_replication", [[0, 1]], "layer replication"),
        ("some_future_option", {"on": True}, "unknown key 'some_future_option'"),
    ],
)
def test_adapter_config_unsupported_variant(work, command, key, value, named):
    edit_json(work / "adapter" / CONFIG_NAME, **{key: value})
    _merge_refused(work, command, 3, key, named, "not supported" if "unknown" not in named else "refusing")


# ---- adapter tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_tensor_missing_half_of_a_pair(work, command):
    edit_tensors(work / "adapter", lambda t: t.pop(f"{PREFIX}{Q0}.lora_B.weight"))
    _merge_refused(work, command, 3, "tensor missing", f"'{PREFIX}{Q0}.lora_B.weight'")


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_tensors_missing_for_a_targeted_module(work, command):
    def drop(t):
        del t[f"{PREFIX}{V1}.lora_A.weight"], t[f"{PREFIX}{V1}.lora_B.weight"]

    edit_tensors(work / "adapter", drop)
    _merge_refused(work, command, 3, "tensor missing", repr(V1))


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_tensors_for_an_untargeted_module(work, command):
    def add_k(t):
        t[f"{PREFIX}decoder.0.self_attn.k.lora_A.weight"] = torch.zeros(4, 16)
        t[f"{PREFIX}decoder.0.self_attn.k.lora_B.weight"] = torch.ones(16, 4)

    edit_tensors(work / "adapter", add_k)
    _merge_refused(work, command, 3, "'decoder.0.self_attn.k'", "target")


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_unexpected_tensor(work, command):
    edit_tensors(work / "adapter", lambda t: t.__setitem__("optimizer.step", torch.zeros(1)))
    _merge_refused(work, command, 3, "unexpected tensor 'optimizer.step'")


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_tensor_of_the_wrong_shape(work, command):
    edit_tensors(work / "adapter", lambda t: t.__setitem__(f"{PREFIX}{Q0}.lora_A.weight", torch.ones(4, 12)))
    # merge-and-export checks the adapter against the model; merge, the update against the tensor
    shape = "(4, 12)" if command == "merge-and-export" else "(16, 12)"
    _merge_refused(work, command, 3, repr(Q0), shape)


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_rank_mismatch_between_a_and_b(work, command):
    edit_tensors(work / "adapter", lambda t: t.__setitem__(f"{PREFIX}{Q0}.lora_B.weight", torch.ones(16, 3)))
    _merge_refused(work, command, 3, Q0, "rank mismatch", "(4, 16)", "(16, 3)")


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_rank_disagrees_with_config(work, command):
    edit_json(work / "adapter" / CONFIG_NAME, r=8)
    _merge_refused(work, command, 3, "rank 4", "r=8")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("which", "bad"), [("A", math.nan), ("B", math.inf), ("B", -math.inf)])
def test_adapter_non_finite_values_refused_before_merging(work, command, which, bad):
    key = f"{PREFIX}{V1}.lora_{which}.weight"

    def poison(t):
        t[key][1, 2] = bad

    edit_tensors(work / "adapter", poison)
    _merge_refused(work, command, 3, f"'{key}'", "NaN or Inf", "refusing to merge")


@pytest.mark.parametrize("command", COMMANDS)
def test_adapter_for_another_architecture(work, command, seq2seq_adapter):
    adapter = copy_dir(seq2seq_adapter, work / "s2s-adapter")  # targets encoder.*, decoder.*.cross_attn
    _merge_refused(work, command, 3, "another architecture", adapter=adapter)


# ---- pickle adapters ----------------------------------------------------------------------------
class _Spy:
    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_adapter_refused_by_default_without_unpickling(work, command, monkeypatch):
    to_pickle(work / "adapter")
    spy = _Spy(torch.load)
    monkeypatch.setattr(torch, "load", spy)
    _merge_refused(work, command, 3, PICKLE_NAME, "--allow-pickle")
    assert spy.calls == []  # refused before opening it


def test_pickle_adapter_with_allow_pickle_loads_weights_only(work, monkeypatch):
    to_pickle(work / "adapter")
    spy = _Spy(torch.load)
    monkeypatch.setattr(torch, "load", spy)
    ok(_merge("merge", work / "base", work / "adapter", work / "out", "--allow-pickle"))
    assert spy.calls and all(c.get("weights_only") is True for c in spy.calls)
    merged, base = (
        load_file(str(work / "out" / "model.safetensors")),
        load_file(str(work / "base/model.safetensors")),
    )
    assert not torch.equal(merged[f"{Q0}.weight"], base[f"{Q0}.weight"])  # the adapter was merged


class _Payload:
    """Unpickling this would create ``path``: code execution, which weights_only must refuse."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_adapter_that_runs_code_is_refused_even_when_allowed(work, command):
    marker = work.parent / f"{work.name}-pwned"  # outside the snapshot, so its absence is checked apart
    to_pickle(work / "adapter", {"x": _Payload(marker)})
    with untouched(work):
        r = _merge(command, work / "base", work / "adapter", work / "out", "--allow-pickle")
        refused(r, 3, PICKLE_NAME, "weights_only=True")
        assert not marker.exists()


# ---- the output location ------------------------------------------------------------------------
@pytest.mark.parametrize("command", [*COMMANDS, "export"])
def test_existing_output_refused_without_force(work, command):
    out = work / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier result")
    with untouched(work):
        if command == "export":
            r = run("export", "--model", work / "base", "--adapter", work / "adapter", "--out", out)
        else:
            r = _merge(command, work / "base", work / "adapter", out)
        refused(r, 3, "output exists", str(out), "--force")


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_file_is_not_writable(work, command):
    (work / "file").write_text("not a folder")
    with untouched(work):
        r = _merge(command, work / "base", work / "adapter", work / "file" / "out")
        refused(r, 3, "not a directory", str(work / "file"))


@pytest.mark.parametrize("command", COMMANDS)
def test_output_in_a_read_only_folder_is_not_writable(work, command, monkeypatch):
    parent = work / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the writability check see what a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if Path(p) == parent else real(p, m, **kw))
    try:
        with untouched(work):
            r = _merge(command, work / "base", work / "adapter", parent / "out")
            refused(r, 3, "cannot write", str(parent))
    finally:
        parent.chmod(0o755)


@pytest.mark.slow
def test_disk_full_during_export_leaves_nothing(work, monkeypatch):
    """merge's full disk is test_stream.py::test_full_disk_leaves_nothing; this is the ONNX stage."""
    from loraexport.export import onnx as onnx_export

    real = onnx_export._export_one

    def full(spec, path, *args, **kwargs):
        real(spec, path, *args, **kwargs)  # one graph written, then the disk fills up
        with open(path, "ab") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export, "_export_one", full)
    out = previous_output(work / "out", "keep.txt")  # --force may replace it
    with untouched(work):
        r = _merge("merge-and-export", work / "base", work / "adapter", out, "--force")
        refused(r, 3, "no space left on device", str(out))


def test_disk_full_while_saving_a_trained_adapter_leaves_nothing(
    tmp_path, sample_base, small_data, monkeypatch
):
    import loraexport.core.io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loraexport.core.io, "save_file", full)
    with untouched(tmp_path):
        r = run(
            "train",
            "--base",
            sample_base,
            "--data",
            small_data,
            "--out",
            tmp_path / "adapter",
            "--steps",
            "2",
            "--batch-size",
            "4",
        )
        refused(r, 3, "no space left on device")


# ---- interrupted merges -------------------------------------------------------------------------
def test_interrupt_during_the_in_memory_merge_leaves_nothing(work, monkeypatch):
    """`merge`'s streaming merge: test_stream.py::test_sigint_leaves_nothing; export: the other file."""
    import loraexport.stages.merge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loraexport.stages.merge, "merge_state_dict", interrupted)
    out = previous_output(work / "out", "keep.txt")  # --force may replace it
    with untouched(work):
        r = _merge("merge-and-export", work / "base", work / "adapter", out, "--force")
        assert one_line(r, 130, "interrupted: ") == "interrupted: nothing was written"


@pytest.mark.slow
@needs_bin
@pytest.mark.parametrize(
    "sig, code, message",
    [
        (signal.SIGINT, 130, "interrupted: nothing was written"),
        (signal.SIGTERM, 143, "terminated: nothing was written"),
    ],
)
def test_real_signal_during_merge_exits_and_leaves_nothing(work, sig, code, message):
    """A real SIGINT / SIGTERM to the real console script, in the middle of writing the merged shard."""
    out = previous_output(work / "out", "keep.txt")  # --force may replace it
    args = ["merge", "--base", work / "base", "--adapter", work / "adapter", "--out", out, "--force"]
    with untouched(work):
        hook = work.parent / f"{work.name}-hook"  # outside the folder that must stay untouched
        assert one_line(signalled(hook, sig, *args), code, message) == message


@pytest.mark.parametrize("command", ["merge", "merge-and-export"])
def test_unreadable_base_shard_is_blamed_on_the_input(work, monkeypatch, command):
    """A permission error on an input is the input's: exit 3 naming it, not 'cannot write OUT'."""
    import builtins

    shard = str(work / "base" / "model.safetensors")
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == shard:
            raise PermissionError(errno.EACCES, "Permission denied", shard)
        return real_open(file, *args, **kwargs)

    with untouched(work):
        with monkeypatch.context() as m:
            m.setattr(builtins, "open", guarded)
            r = _merge(command, work / "base", work / "adapter", work / "out")
        line = refused(r, 3, "model.safetensors")
        assert "cannot write" not in line


def test_disk_full_in_the_middle_of_a_shard_leaves_nothing(work, monkeypatch):
    """The disk fills up after the merged shard is partly written: exit 3, one line, and the
    output location exactly as before (the half-written shard and its folder removed)."""
    from loraexport.lora import stream

    real, calls = stream._write_all, []

    def fill_up(dst, data):
        calls.append(1)
        if len(calls) == 3:  # the header and a tensor are written; the next write fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(dst, data)

    monkeypatch.setattr(stream, "_write_all", fill_up)
    out = previous_output(work / "out", "keep.txt")  # --force may replace it
    with untouched(work):
        refused(
            _merge("merge", work / "base", work / "adapter", out, "--force"),
            3,
            "no space left on device",
            str(out),
        )
    assert len(calls) == 3
