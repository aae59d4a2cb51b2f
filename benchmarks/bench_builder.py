"""onnxruntime-genai's model builder as `make bench`'s peer (issue 25), on the SmolLM2 shape.

The builder takes a Hugging Face folder: the merged model (PEFT ``merge_and_unload``, which
``bench.py`` loads anyway) saved with ``save_pretrained``, and a three-token tokenizer, because the
builder loads one (``AutoTokenizer``) and a random model has none; prompts are token ids, so it is
never used. The builder runs offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, its own
``hf_token=false``; checked once with no network at all, ``unshare -n``) with its defaults for
the CPU: int4 is MatMulNBits in blocks of 32, symmetric, accuracy level 4, every MatMul 4-bit.

Export time, same run: `python -m onnxruntime_genai.models.builder -i MERGED -p int4 -e cpu`
against `python -m loraexport.cli export --model BASE --adapter ADAPTER --quantize int4` (the
default export: the fused graph written from the checkpoint), each its own process, so both
wall times include the interpreter and its imports; the builder's excludes the merge that made
its input (timed beside it; saved every run and removed once read). Both are made fresh every run;
the builder's float32 export is reused while the base, the adapter and onnxruntime-genai's version
are unchanged.

The race: decode (a 128-token prompt, then 64 greedy tokens, batch 1, end to end) of the builder's
int4 and float32 files run by onnxruntime-genai, our int4 and float32 through
``loraexport.runtime`` and our int4 run by onnxruntime-genai, interleaved, with onnxruntime's
thread spinning set the same on both sides (``--race-spinning``, on by default: what an app uses;
no torch work runs while it is timed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUILDER = "onnxruntime_genai.models.builder"
EXPORT_ROUNDS = 3  # each int4 export timed this many times, alternated; the median is its figure
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# The three tokens the builder's tokenizer needs (bos 1 and eos 2, as bench_models.SMOLLM2 says).
TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2}
# The race's rows: key -> (label, who runs it); ours_fp32 only when bench.py has that export.
PEERS = {
    "builder_int4": ("onnxruntime-genai builder int4 (its defaults)", "genai"),
    "ours_int4": ("loraexport `export --quantize int4`, loraexport.runtime", "runtime"),
    "ours_int4_genai": ("loraexport int4, run by onnxruntime-genai", "genai"),
    "builder_fp32": ("onnxruntime-genai builder float32", "genai"),
    "ours_fp32": ("loraexport float32 --optimize, loraexport.runtime", "runtime"),
}


class BuildFailed(RuntimeError):
    """An export command that exited non-zero; the message ends with its output's last lines."""


@dataclass
class Peer:
    """One row of the race: a folder, who runs it, and what making it cost."""

    key: str
    label: str
    directory: Path
    runner: str  # "genai" | "runtime"
    export_s: float | None = None  # the median of export_runs
    export_note: str = ""  # how export_s was measured
    note: str = ""  # why the row is not timed
    export_runs: list[float] = field(default_factory=list)  # seconds of each timed export


def file_bytes(directory: Path) -> int:
    """Bytes of what onnxruntime loads: the graphs and their external data (``*.onnx*``, ``*.data``),
    not the configuration or tokenizer files beside them."""
    return sum(
        p.stat().st_size
        for p in directory.iterdir()
        if p.is_file() and (".onnx" in p.name or p.suffix == ".data") and not p.name.endswith(".json")
    )


def tree_stamp(d: Path) -> list:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir() if p.is_file())


def genai_version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")


# ---- the builder's input ------------------------------------------------------------------------
def save_merged(merged_model, out: Path) -> float:
    """The merged model as a Hugging Face folder with a tokenizer, in ``out``; the seconds it took."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    merged_model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel(TOKENS, unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return time.perf_counter() - t0


# ---- exports, each its own process ----------------------------------------------------------------
def run_timed(cmd: list[str], log_path: Path, ok: tuple[int, ...] = (0,)) -> float:
    """Run ``cmd`` offline with this repository first on the path; its wall seconds. Output goes
    to ``log_path``; an exit code not in ``ok`` raises ``BuildFailed`` with the log's last lines."""
    env = os.environ | OFFLINE
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - t0
    if r.returncode not in ok:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise BuildFailed(f"exit {r.returncode} from {' '.join(cmd[:4])} …: {' | '.join(tail)[-300:]}")
    return seconds


def builder_export(hf_dir: Path, out: Path, precision: str) -> float:
    """The builder's CPU export at ``precision`` with its defaults; wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cache = out.parent / f"{out.name}.cache"
    cmd = [sys.executable, "-m", BUILDER, "-i", str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu"]
    cmd += ["-c", str(cache), "--extra_options", "hf_token=false"]
    try:
        return run_timed(cmd, out.parent / f"{out.name}.log")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def ours_export(base: Path, adapter: Path, out: Path) -> float:
    """`loraexport export --quantize int4` (no other option: the default export); wall seconds."""
    cmd = [sys.executable, "-m", "loraexport.cli", "export", "--model", str(base), "--adapter", str(adapter)]
    cmd += ["--out", str(out), "--quantize", "int4", "--force"]
    return run_timed(cmd, out.parent / f"{out.name}.log")


def cached(out: Path, key: dict, make, fresh: bool) -> tuple[float, bool]:
    """``make()`` (which writes ``out`` and returns its seconds), skipped while ``out`` has a
    genai_config.json and ``out``.key.json records the same ``key``: (seconds when made, reused)."""
    stamp = out.parent / f"{out.name}.key.json"
    want = json.loads(json.dumps(key))
    if not fresh and stamp.is_file() and (out / "genai_config.json").is_file():
        have = json.loads(stamp.read_text())
        if have.get("key") == want:
            return have["seconds"], True
    stamp.unlink(missing_ok=True)
    seconds = make()
    stamp.write_text(json.dumps({"key": want, "seconds": seconds}))
    return seconds, False


def cached_builder_export(hf_dir: Path, out: Path, precision: str, inputs: dict, fresh: bool):
    """``builder_export``, reused while ``inputs`` (what the merged model came from) and
    onnxruntime-genai's version are unchanged: (seconds when made, reused)."""
    key = inputs | {"genai": genai_version(), "p": precision}
    return cached(out, key, lambda: builder_export(hf_dir, out, precision), fresh)


def make_peers(merged_model, base: Path, adapter: Path, ours_fp32: Path | None, root: Path, fresh: bool, log):
    """The race's rows, their exports made (or reused, see the module's text); a row whose export
    failed carries the reason in ``note``. Also returns the seconds saving the builder's input took
    (the merged model, saved every run and removed once the builder has read it)."""
    root.mkdir(parents=True, exist_ok=True)
    hf_dir = root / "merged"
    merge_s = save_merged(merged_model, hf_dir)
    try:
        return _export_peers(hf_dir, base, adapter, ours_fp32, root, fresh, log), merge_s
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


def _export_peers(hf_dir: Path, base: Path, adapter: Path, ours_fp32: Path | None, root: Path, fresh, log):
    b4, o4, b32 = root / "builder_int4", root / "ours_int4", root / "builder_fp32"
    folders = {"builder_int4": b4, "ours_int4": o4, "ours_int4_genai": o4, "builder_fp32": b32}
    folders["ours_fp32"] = ours_fp32
    peers = {
        key: Peer(key, label, folders[key], runner)
        for key, (label, runner) in PEERS.items()
        if folders[key] is not None
    }
    makers = {
        "ours_int4": lambda: ours_export(base, adapter, o4),
        "builder_int4": lambda: builder_export(hf_dir, b4, "int4"),
    }
    for round_ in range(EXPORT_ROUNDS):  # alternated, who goes first too: a noisy moment hits both
        for key in list(makers) if round_ % 2 == 0 else list(makers)[::-1]:
            if peers[key].note:
                continue  # failed once: not timed again
            log(f"  race: exporting {key} (timed, its own process; round {round_ + 1} of {EXPORT_ROUNDS}) …")
            try:
                peers[key].export_runs.append(makers[key]())
                log(f"  race: {key} exported in {peers[key].export_runs[-1]:.1f} s")
            except (BuildFailed, OSError) as e:
                peers[key].note = f"export failed: {e}"
                log(f"  race: {peers[key].note}")
    for key in makers:
        runs = peers[key].export_runs
        if runs and not peers[key].note:
            peers[key].export_s = float(np.median(runs))
            peers[key].export_note = f"this run, its own process, median of {len(runs)} alternated"
    peers["ours_int4_genai"].note = peers["ours_int4"].note
    try:
        inputs = {"base": tree_stamp(base), "adapter": tree_stamp(adapter)}
        seconds, reused = cached_builder_export(hf_dir, b32, "fp32", inputs, fresh)
        peers["builder_fp32"].export_s = seconds
        peers["builder_fp32"].export_note = "when made (reused)" if reused else "this run, its own process"
        log(f"  race: builder_fp32 {'reused' if reused else 'exported'} ({seconds:.1f} s when made)")
    except (BuildFailed, OSError) as e:
        peers["builder_fp32"].note = f"export failed: {e}"
    return peers


# ---- runners ------------------------------------------------------------------------------------
def genai_model(directory: Path, threads: int, spinning: bool):
    """onnxruntime-genai's ``Model`` of ``directory``, with our threads and ``spinning`` overlaid on
    its session options (the files are not touched)."""
    import onnxruntime_genai as og

    spin = "1" if spinning else "0"
    cfg = og.Config(str(directory))
    opts = {
        "intra_op_num_threads": threads,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": spin,
        "session.inter_op.allow_spinning": spin,
    }
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    return og.Model(cfg)


def genai_decode(directory: Path, threads: int, spinning: bool):
    """onnxruntime-genai's own loop on ``directory`` (``genai_model``)."""
    import onnxruntime_genai as og

    model = genai_model(directory, threads, spinning)

    def decode(ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        total = ids.shape[1] + n
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        gen.append_tokens(ids.astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return np.asarray(gen.get_sequence(0))[ids.shape[1] :]

    return decode


def runtime_decode(directory: Path, threads: int, spinning: bool):
    from loraexport.runtime.model import OnnxModel

    om = OnnxModel(directory, threads=threads, spinning=spinning)
    return lambda ids, mask, n: om.generate(ids, mask, n)[0]


def decoder(peer: Peer, threads: int, spinning: bool):
    make = genai_decode if peer.runner == "genai" else runtime_decode
    return make(peer.directory, threads, spinning)


def graph_file(directory: Path) -> Path:
    """The decoder graph: genai_config.json's ``decoder.filename``, else model.onnx."""
    cfg = directory / "genai_config.json"
    if cfg.is_file():
        name = json.loads(cfg.read_text()).get("model", {}).get("decoder", {}).get("filename")
        if name:
            return directory / name
    return directory / "model.onnx"


def race(peers: dict[str, Peer], ids: np.ndarray, n: int, reference: np.ndarray | None, args, log) -> dict:
    """Decode every peer interleaved (one call of each per round, shuffled), ``args.race_spinning``
    on both sides; the rows with tok/s, IQR, × the builder's int4, bytes and the greedy tokens'
    agreement with ``reference`` (PEFT eager's). ``bw_eff`` is filled by ``bench.apply_ceilings``."""
    from bench_models import onnx_weight_bytes

    from loraexport.verify.latency import time_interleaved

    mask = np.ones_like(ids)
    live, rows = {}, []
    for p in peers.values():
        entry = {"key": p.key, "label": p.label, "runner": p.runner, "note": p.note}
        entry |= {"export_s": p.export_s, "export_note": p.export_note, "export_runs": p.export_runs}
        if not p.note:
            entry["file_bytes"] = file_bytes(p.directory)
            entry["weight_bytes_per_token"] = onnx_weight_bytes(graph_file(p.directory))
            try:
                live[p.key] = decoder(p, args.threads, args.race_spinning)
            except Exception as e:  # a file the runner refuses: the row says so, the race goes on
                entry["note"] = f"not available: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append(entry)
    log(f"  race: decode {ids.shape[1]}+{n}, {len(live)} rows interleaved, spinning {args.race_spinning} …")
    tokens = {k: np.asarray(fn(ids, mask, n)) for k, fn in live.items()}  # also the warm-up
    variants = {k: (lambda fn=fn: fn(ids, mask, n)) for k, fn in live.items()}
    rounds = max(3, args.rounds // 2)
    stats = time_interleaved(
        variants, warmup=0, min_runs=rounds, floor_runs=rounds, max_runs=100, budget_s=args.budget * 2
    )
    tok_s = {k: n / (st.p50_ms / 1e3) for k, st in stats.items()}
    for entry in rows:
        k = entry["key"]
        if k not in stats:
            continue
        same = None
        if reference is not None:
            differs = np.flatnonzero(tokens[k][:n] != reference[:n])
            same = int(differs[0]) if differs.size else n
        entry["decode"] = {
            "tok_s": tok_s[k],
            "p50_ms": stats[k].p50_ms,
            "iqr_rel": stats[k].iqr_ms / stats[k].p50_ms,
            "runs": stats[k].runs,
            "vs_builder_int4": tok_s[k] / tok_s["builder_int4"] if "builder_int4" in tok_s else None,
            "bw_eff": None,
            "same_prefix_as_peft": same,
        }
    del live, variants
    return {"spinning": args.race_spinning, "threads": args.threads, "rows": rows}
