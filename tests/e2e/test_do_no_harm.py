"""Issue 11, "do no harm", through the CLI: a test per class of defect plus the issue's recipes.

Each case asserts the exit code, one line on stderr, no traceback, and every input (and any
file that was there before) byte-identical afterwards. The recipes use the issue's set-up: a
tiny Llama in ``llama/``, a PEFT r=4 q,v adapter in ``ad/``, a copy of ``samples/base`` in
``ref/``, side by side in one folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from artifacts import copy_dir, make_hf_decoder, make_peft_adapter
from clihelp import (
    BIN,
    leftovers,
    needs_bin,
    ok,
    one_line,
    peak_rss_mb,
    previous_output,
    program,
    refused,
    run,
    signalled,
    sitecustomize,
    untouched,
)
from conftest import SAMPLE_BASE

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = needs_bin
RSS_LIMIT_MB = 1024  # the bound for every hostile-size case


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """llama/ (tiny Llama), ad/ (PEFT r=4 q,v, B non-zero), ref/ (samples/base)."""
    root = tmp_path_factory.mktemp("recipes")
    model = make_hf_decoder(root / "llama", "llama")
    make_peft_adapter(model, root / "ad", "llama")
    shutil.copytree(SAMPLE_BASE, root / "ref")
    (root / "eval.jsonl").write_text('{"source": "123", "target": "321"}\n')
    (root / "held.jsonl").write_text('{"source": "123", "target": "321"}\n')  # --eval-data of its own
    return root


@pytest.fixture
def w(recipes, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the recipes' folder, as the working directory."""
    root = copy_dir(recipes, tmp_path / "w")
    monkeypatch.chdir(root)
    return root


# ---- 1. data loss: an output may never be, contain or sit inside an input ------------------------
COMMANDS = {  # every command that writes an output, with the inputs it reads
    "merge": (["merge", "--base", "llama", "--adapter", "ad"], ["llama", "ad"]),
    "export": (["export", "--model", "llama", "--adapter", "ad"], ["llama", "ad"]),
    "merge-and-export": (
        ["merge-and-export", "--base", "llama", "--adapter", "ad", "--eval-data", "eval.jsonl"],
        ["llama", "ad", "eval.jsonl"],
    ),
    "train": (["train", "--base", "ref", "--data", "eval.jsonl"], ["ref", "eval.jsonl"]),
    "analyze": (["analyze", "--base", "llama", "--adapter", "ad"], ["llama", "ad"]),
    "sweep": (["sweep", "--base", "ref", "--data", "eval.jsonl"], ["ref", "eval.jsonl"]),
}
CASES = [
    (command, out, expected)
    for command, (_, inputs) in COMMANDS.items()
    for out, expected in [
        *((i, "is the") for i in inputs),
        (f"{inputs[0]}/sub", "sits inside the"),
        (".", "does not name"),  # the parent of every input, as the recipe gives it
        ("..", "does not name"),
        ("", "does not name"),
    ]
]


@pytest.mark.parametrize("command, out, expected", CASES)
def test_output_is_never_an_input(w, command, out, expected):
    """The issue's first recipe and its neighbours, for every command that writes, with --force."""
    args, _ = COMMANDS[command]
    with untouched(w.parent):
        line = refused(run(*args, "--out", out, "--force"), 2, expected)
    if expected != "does not name":
        assert str(w / out) in line and "an output may never be, contain or sit inside an input" in line


def test_the_parent_of_every_input_is_refused(w, tmp_path):
    with untouched(tmp_path):
        r = run("merge", "--base", w / "llama", "--adapter", w / "ad", "--out", w, "--force")
        line = refused(r, 2, "contains the --base")
    assert str(w / "llama") in line


def test_links_are_resolved(w):
    (w / "to-llama").symlink_to(w / "llama")
    (w / "models").mkdir()
    (w / "models" / "base").symlink_to(w / "llama")
    merge = ["merge", "--adapter", "ad", "--base"]
    with untouched(w):
        refused(run(*merge, "llama", "--out", "to-llama", "--force"), 2, "is the --base")
        refused(run(*merge, "models/base", "--out", "llama", "--force"), 2, "is the --base")
        refused(run(*merge, "models/base", "--out", "to-llama/x"), 2, "sits inside")


def test_every_input_of_verify_and_merge_and_export_is_guarded(w):
    """--eval-data and --onnx are inputs too."""
    (w / "evals").mkdir()
    shutil.move(w / "eval.jsonl", w / "evals" / "eval.jsonl")
    with untouched(w):
        r = run(
            "merge-and-export",
            "--base",
            "ref",
            "--adapter",
            "ad",
            "--eval-data",
            "evals/eval.jsonl",
            "--out",
            "evals",
            "--force",
        )
        refused(r, 2, "contains the --eval-data")
        r = run("verify", "--base", "ref", "--adapter", "ad", "--onnx", "ref", "--report", "ref/report.json")
        refused(r, 2, "sits inside the --base")
        r = run("verify", "--base", "llama", "--adapter", "ad", "--onnx", "ref", "--report", "ref/r.json")
        refused(r, 2, "sits inside the --onnx")


# ---- --report follows the same rules, checked before any work ------------------------------------
def test_report_cannot_overwrite_an_input_or_any_file(w):
    """The issue's recipe (--report llama/config.json) and its neighbours. --onnx names a folder
    that does not exist: the report's error comes first, so it was checked before any work."""
    (w / "notes.json").write_text('{"mine": true}')
    (w / "reports").mkdir()
    (w / "file").write_text("x")
    with untouched(w):
        verify = ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "no-such-onnx"]
        refused(run(*verify, "--report", "llama/config.json"), 2, "sits inside the --base")
        refused(run(*verify, "--report", "notes.json"), 3, "output exists", "--force")
        refused(run(*verify, "--report", "notes.json", "--force"), 3, "not a loraexport report")
        refused(run(*verify, "--report", "reports", "--force"), 3, "is a folder")
        refused(run(*verify, "--report", "file/report.json"), 3, "not a directory")
        refused(run(*verify, "--report", "report.md"), 2, "ends in .md")
        refused(
            run(*verify, "--report", "report.MD"), 2, "ends in .md"
        )  # the same file as its .md, on some disks
    (w / "r.md").write_text("my notes")  # the .md written beside the report is an output too
    with untouched(w):
        refused(run(*verify, "--report", "r.json"), 3, "output exists", str(w / "r.md"))


def test_report_is_written_atomically_and_replaced_only_when_ours(
    w, causal_base, causal_adapter, causal_onnx
):
    args = [
        "verify",
        "--base",
        causal_base,
        "--adapter",
        causal_adapter,
        "--onnx",
        causal_onnx,
        "--no-latency",
        "--samples",
        "1",
    ]
    ok(run(*args, "--report", "out/r.json"))
    report = json.loads((w / "out" / "r.json").read_text())
    assert report["passed"] is True and (w / "out" / "r.md").read_text().startswith("# loraexport report")
    refused(run(*args, "--report", "out/r.json"), 3, "output exists")
    ok(run(*args, "--report", "out/r.json", "--force"))
    assert sorted(p.name for p in (w / "out").iterdir()) == ["r.json", "r.md"]  # no temporary left


# ---- the swap: never removes what it did not write -----------------------------------------------
BARRIER = textwrap.dedent(
    """
    # Injected by the test (sitecustomize runs at start-up): each run waits at the final swap
    # until the other has arrived there too, so both have done all their work when they race.
    import os, time
    from pathlib import Path
    from loraexport.artifact.output import swap as output

    real = output.swap_in

    def swap(*args):
        barrier = Path(os.environ["BARRIER"])
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.02)
        return real(*args)

    output.swap_in = swap
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("race", ["at the swap", "free"])
def test_two_concurrent_runs_to_one_new_output(w, causal_base, causal_adapter, tmp_path, race):
    """Exactly one succeeds, the other exits 3 and leaves the winner's output alone, which
    `verify --check-files` then passes. "at the swap": both finished their work before either
    swapped (made certain by a barrier); "free": as it comes."""
    env = {}
    if race == "at the swap":
        (tmp_path / "barrier").mkdir()
        env = sitecustomize(tmp_path / "hook", BARRIER) | {"BARRIER": str(tmp_path / "barrier")}
    args = [
        str(BIN),
        "--quiet",
        "merge-and-export",
        "--base",
        str(causal_base),
        "--adapter",
        str(causal_adapter),
    ]
    args += ["--out", str(w / "out"), "--no-latency", "--samples", "1"]
    procs = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env)
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    loser = next(err for code, _, err in results if code == 3)
    assert len(loser.strip().splitlines()) == 1, loser
    if race == "at the swap":
        assert "created or replaced by someone else while this run worked" in loser
    ok(program("verify", "--check-files", w / "out"))
    assert leftovers(w, "out") == []  # no temporary folder left


# ---- 2. leftovers --------------------------------------------------------------------------------
def test_symlink_or_file_at_out_is_refused_and_nothing_left(w):
    previous_output(w / "prev")
    (w / "link").symlink_to(w / "prev")
    (w / "a-file").write_text("x")
    with untouched(w):
        for out in ("link", "a-file"):
            r = run("merge", "--base", "llama", "--adapter", "ad", "--out", out, "--force")
            refused(r, 3, out)


@pytest.mark.slow
def test_stale_temporary_folder_of_a_killed_run_is_removed(w, tmp_path):
    """A run killed with SIGKILL leaves its temporary folder; the next run to that output
    removes it (owned by name and PID: the process is gone)."""
    env = sitecustomize(
        tmp_path / "hook",
        "import os, signal\nfrom loraexport.artifact.output import swap\n"
        "swap.swap_in = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    args = ["merge", "--base", "llama", "--adapter", "ad", "--out", "out"]
    assert program(*args, env=env).returncode == -signal.SIGKILL
    stale = [p for p in w.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1
    ok(program(*args))
    assert not stale[0].exists() and (w / "out" / "model.safetensors").is_file()


def test_output_gets_the_users_umask(w):
    r = subprocess.run(
        ["sh", "-c", f"umask 027 && exec {BIN} --quiet merge --base llama --adapter ad --out out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ok(r)
    assert (w / "out").stat().st_mode & 0o777 == 0o750


@pytest.mark.slow
def test_sighup_cleans_up_like_sigterm(w, tmp_path):
    args = ["merge", "--base", "llama", "--adapter", "ad", "--out", "out"]
    with untouched(w):
        r = signalled(tmp_path / "hook", signal.SIGHUP, *args)
        assert one_line(r, 129, "terminated (SIGHUP): ") == "terminated (SIGHUP): nothing was written"


def test_name_too_long_leaves_no_parent_behind(w):
    with untouched(w):
        r = run("merge", "--base", "llama", "--adapter", "ad", "--out", "new/" + "x" * 250)
        refused(r, 2, "too long")


# ---- 3. numbers the code cannot use: exit 2 naming the option ------------------------------------
NUMBERS = [
    ("train", "--lr", "nan"),
    ("train", "--lr", "-1"),
    ("train", "--lr", "inf"),
    ("train", "--seed", "1e23"),
    ("train", "--seed", str(10**23)),
    ("train", "--rank", "1e8"),
    ("train", "--rank", str(10**8)),
    ("train", "--dropout", "1"),
    ("train", "--alpha", "nan"),
    ("train", "--steps", "0"),
    ("train", "--batch-size", str(2**40)),
    ("train", "--eval-fraction", "1"),
    ("train", "--warmup", "1.5"),
    ("train", "--warmup", "-1"),
    ("train", "--grad-accum", "0"),
    ("train", "--max-length", "1"),
    ("train", "--max-length", str(10**6)),
    ("verify", "--threads", str(2**40)),
    ("verify", "--samples", str(10**9)),
    ("verify", "--weight", "inf"),
    ("merge-and-export", "--threads", "0"),
    ("sweep", "--budget-rank", str(10**8)),
    ("sweep", "--ranks", "1,99999999"),
    ("sweep", "--seeds", str(10**6)),
    ("analyze", "--draws", str(10**9)),
    ("analyze", "--seed", "-1"),
]


@pytest.mark.parametrize("command, option, value", NUMBERS)
def test_numbers_that_cannot_work_are_usage_errors(w, command, option, value):
    base = {
        "train": ["--base", "ref", "--data", "eval.jsonl", "--out", "o"],
        "sweep": ["--base", "ref", "--data", "eval.jsonl", "--out", "o"],
    }
    base |= {
        "verify": ["--base", "ref", "--adapter", "ad", "--onnx", "ref"],
        "merge-and-export": ["--base", "ref", "--adapter", "ad", "--out", "o"],
        "analyze": ["--base", "ref", "--adapter", "ad", "--out", "o"],
    }
    extra = ["--adapter", "ad"] if option == "--weight" else []
    with untouched(w):
        refused(run(command, *base[command], *extra, option, value), 2, option)


TRAIN = ["train", "--base", "ref", "--data", "eval.jsonl", "--eval-data", "held.jsonl", "--out", "o"]


@pytest.mark.slow
def test_rank_beyond_the_layers_is_refused_before_allocating(w):
    """--rank 2000000 on a 128-wide model would allocate gigabytes: bounded by the layer."""
    with untouched(w):
        r, mb = peak_rss_mb(*TRAIN, "--rank", "60000")
        refused(r, 3, "rank 60000 is larger than", "at most 128")
    assert mb < RSS_LIMIT_MB, mb


def test_training_that_diverges_writes_nothing(w, monkeypatch):
    """A loss that becomes NaN (here: forced at step 3) stops training with exit 3."""
    from loraexport.training import loop as train_module

    real, calls = train_module._loss, []

    def nan_at_step_3(model, batch):
        loss, n = real(model, batch)
        calls.append(1)
        return (loss * float("nan"), n) if len(calls) == 3 else (loss, n)

    monkeypatch.setattr(train_module, "_loss", nan_at_step_3)
    with untouched(w):
        r = run(*TRAIN, "--steps", "10")
        refused(r, 3, "training diverged at step 3 of 10", "nothing was written")


# ---- data files: bad bytes are bad input (exit 3), never an internal error -----------------------
HOSTILE_DATA = {
    "not-utf8": b'{"source": "\xff\xfe", "target": "1"}\n',
    "deep": b"[" * 100_000 + b"]" * 100_000 + b"\n",
    "long-number": b'{"source": "1", "target": "1", "n": ' + b"9" * 5000 + b"}\n",
    "endless-line": b'{"source": "' + b"1" * (5 * 1024 * 1024),
}


@pytest.mark.parametrize("kind", HOSTILE_DATA)
@pytest.mark.parametrize("command", ["train", "verify", "merge-and-export"])
def test_hostile_data_files(w, kind, command):
    (w / "bad.jsonl").write_bytes(HOSTILE_DATA[kind])
    if command == "train":
        args = ["train", "--base", "ref", "--data", "bad.jsonl", "--out", "o"]
    elif command == "verify":
        args = ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "o", "--eval-data", "bad.jsonl"]
    else:
        args = [
            "merge-and-export",
            "--base",
            "llama",
            "--adapter",
            "ad",
            "--out",
            "o",
            "--eval-data",
            "bad.jsonl",
        ]
    with untouched(w):
        refused(run(*args), 3, "bad.jsonl:1")


# ---- 5. unbounded memory: sizes checked before anything is read ----------------------------------
def test_huge_adapter_config_is_refused_unread(w):
    """A 5 GB (sparse) adapter_config.json: refused by its size, in bounded memory."""
    with open(w / "ad" / "adapter_config.json", "r+b") as f:
        f.truncate(5 * 1024**3)
    r, mb = peak_rss_mb("merge", "--base", "llama", "--adapter", "ad", "--out", "o")
    refused(r, 3, "adapter_config.json", "over the 8.4 MB")
    assert mb < RSS_LIMIT_MB, mb
    assert not (w / "o").exists()


def test_help_documents_the_exit_codes_and_the_promise():
    r = run("--help")
    text = " ".join(r.stdout.split())
    for code in (
        "2 usage error",
        "3 invalid input",
        "4 verification failed",
        "129 hangup",
        "130 interrupted",
        "143 terminated",
    ):
        assert code in text, code
    assert "An output is never an input" in text


def test_cli_rank_defaults_match_the_library():
    from loraexport.analyze import sweep
    from loraexport.cli import types as analyze_cli

    assert analyze_cli.RANKS == sweep.RANKS


@pytest.mark.parametrize("signum, code, line", [(15, 143, "terminated: "), (1, 129, "terminated (SIGHUP): ")])
def test_a_signal_while_arguments_are_parsed(monkeypatch, signum, code, line):
    """Before a command runs (click parsing its options), SIGTERM or SIGHUP is still a
    termination with its exit code and one line, not click's "Aborted!" and exit 1."""
    from loraexport.cli.types import Number
    from loraexport.errors import Terminated

    def terminated(self, value, param, ctx):
        raise Terminated(signum, signal.Signals(signum).name)

    monkeypatch.setattr(Number, "convert", terminated)
    r = run("train", "--base", "b", "--data", "d", "--out", "o", "--lr", "0.1")
    assert one_line(r, code, line) == line + "nothing was written"


@pytest.mark.slow
def test_verify_against_an_export_of_another_model(causal_base, causal_adapter, seq2seq_onnx, tmp_path):
    """Another kind (a seq2seq export for a decoder-only base), or the same kind with another
    cache shape: exit 3 naming both, before any comparison runs."""
    from artifacts import make_base

    verify = ["verify", "--base", causal_base, "--adapter", causal_adapter, "--no-latency", "--onnx"]
    with untouched(seq2seq_onnx):
        r = run(*verify, seq2seq_onnx)
        refused(r, 3, "is an export of another model", "seq2seq", "causal")
        deeper = make_base(tmp_path / "deeper", n_encoder_layers=0, n_decoder_layers=3)
        deeper_onnx = tmp_path / "deeper-onnx"
        ok(run("export", "--model", deeper, "--out", deeper_onnx))
        r = run(*verify, deeper_onnx)
        refused(r, 3, "is an export of another model", "(3, 2, 8)", "(2, 2, 8)")


@pytest.mark.slow
def test_a_closed_stdout_is_not_an_internal_error(tmp_path):
    """`loraexport inspect DIR | head -0`: the reader went away; exit 141 as a shell tool, silently."""
    proc = subprocess.Popen(
        [str(BIN), "inspect", str(SAMPLE_BASE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the command prints its answer
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_cli_opset_bounds_match_the_exporters():
    from loraexport.cli import types as cli_types
    from loraexport.export import onnx as onnx_export

    assert cli_types.MIN_OPSET == onnx_export.MIN_OPSET
    assert cli_types.MAX_OPSET == onnx_export.MAX_OPSET
    assert cli_types.MAX_OPSET_TORCHSCRIPT == onnx_export.MAX_OPSETS["torchscript"]


@pytest.mark.parametrize("command", ["merge", "merge-and-export"])
def test_a_targeted_weight_stored_as_integers(w, command):
    """The streaming merge (merge) reads headers only, the in-memory one (merge-and-export)
    builds the model: both refuse an int32 q_proj weight in one line (exit 3)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(w / "llama" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(w / "llama" / "model.safetensors"), metadata={"format": "pt"})
    with untouched(w):
        extra = ["--no-verify"] if command == "merge-and-export" else []
        r = run(command, "--base", "llama", "--adapter", "ad", "--out", "o", *extra)
        refused(r, 3, "q_proj")
