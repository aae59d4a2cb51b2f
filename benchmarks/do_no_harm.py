"""Issue 11's recipes against the real console script: exit code, lines on stderr, whether every
input stayed byte-identical, and peak RSS. Prints a table; exits 1 if any recipe breaks a rule.

    python benchmarks/do_no_harm.py [--dir runs/do-no-harm]

Set-up as in the issue: a tiny Llama in llama/, a PEFT r=4 q,v adapter in ad/, a copy of
samples/base in ref/ (plus an export of llama in onnx/ for the verify recipes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "loraexport"
RSS_LIMIT_MB = 1024


def setup(root: Path) -> None:
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        vocab_size=96,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "llama")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(root / "ad")
    shutil.copytree(REPO / "samples" / "base", root / "ref")
    (root / "data.jsonl").write_text('{"source": "123", "target": "321"}\n' * 4)
    for model, out in (("llama", "onnx"), ("ref", "ref-onnx")):
        cmd = [BIN, "-q", "export", "--model", model, "--out", out] + ["--adapter", "ad"] * (model == "llama")
        subprocess.run(cmd, cwd=root, check=True)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(d) / name
            st = os.lstat(p)
            h.update(f"{p.relative_to(root)} {st.st_mode} {st.st_size} {st.st_mtime_ns}".encode())
            if p.is_file() and not p.is_symlink() and st.st_size < 1 << 30:
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def run(root: Path, args: list[str]) -> tuple[int, list[str], float]:
    wrapper = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    r = subprocess.run(
        [sys.executable, "-c", wrapper, str(BIN), "--quiet", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = r.stderr.strip().splitlines()
    rss_kb = int(lines.pop())
    return r.returncode, lines, rss_kb / 1024


def hostile_files(root: Path) -> None:
    """The files the recipes need, made before the digest is taken."""
    bad = root / "bad"
    bad.mkdir()
    (bad / "not-utf8.jsonl").write_bytes(b'{"source": "\xff", "target": "1"}\n')
    (bad / "deep.jsonl").write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    (bad / "digits.jsonl").write_bytes(b'{"source": "1", "target": "1", "n": ' + b"9" * 5000 + b"}\n")
    for name, edit in {
        "ref-huge": {"d_model": 16384, "d_ff": 16384},
        "ref-maxlen": {"max_len": 10**7},
        "ref-heads": {"n_heads": 5},
        "ref-zero-heads": {"n_heads": 0},
        "ref-string": {"d_model": "128"},
    }.items():
        shutil.copytree(root / "ref", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        cfg.update(edit)
        (root / name / "config.json").write_text(json.dumps(cfg))
    for name, edit in {
        "llama-heads": {"num_attention_heads": 5},
        "llama-zero": {"num_attention_heads": 0},
        "llama-string": {"hidden_size": "32"},
        "llama-archs": {"architectures": 5},
    }.items():
        shutil.copytree(root / "llama", root / name)
        cfg = json.loads((root / name / "config.json").read_text())
        cfg.update(edit)
        (root / name / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(root / "llama", root / "llama-tok")
    (root / "llama-tok" / "tokenizer_config.json").write_text('{"tokenizer_class": 5}')
    shutil.copytree(root / "ad", root / "ad-huge")
    with open(root / "ad-huge" / "adapter_config.json", "r+b") as f:
        f.truncate(5 * 1024**3)
    shutil.copytree(root / "onnx", root / "onnx-huge")
    with open(root / "onnx-huge" / "model.onnx", "r+b") as f:
        f.truncate(6 * 1024**3)
    shutil.copytree(root / "onnx", root / "onnx-typed")
    meta = json.loads((root / "onnx-typed" / "loraexport.json").read_text())
    meta["model"] = 5
    (root / "onnx-typed" / "loraexport.json").write_text(json.dumps(meta))
    shutil.copytree(root / "onnx", root / "onnx-linked")
    (root / "onnx-linked" / "config.json").unlink()
    (root / "onnx-linked" / "config.json").symlink_to(root / "llama" / "config.json")
    (root / "notes.json").write_text('{"mine": true}')


RECIPES: list[tuple[str, list[str], tuple[int, ...]]] = [
    (
        "merge --out = base, --force",
        ["merge", "--base", "llama", "--adapter", "ad", "--out", "llama", "--force"],
        (2,),
    ),
    (
        "merge --out = adapter",
        ["merge", "--base", "llama", "--adapter", "ad", "--out", "ad", "--force"],
        (2,),
    ),
    (
        "merge --out . (parent)",
        ["merge", "--base", "llama", "--adapter", "ad", "--out", ".", "--force"],
        (2,),
    ),
    ("merge --out ''", ["merge", "--base", "llama", "--adapter", "ad", "--out", "", "--force"], (2,)),
    ("merge --out ..", ["merge", "--base", "llama", "--adapter", "ad", "--out", "..", "--force"], (2,)),
    (
        "verify --report llama/config.json",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx", "--report", "llama/config.json"],
        (2,),
    ),
    (
        "verify --report notes.json (no --force)",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx", "--report", "notes.json"],
        (3,),
    ),
    (
        "verify --report a directory",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx", "--report", "bad"],
        (3,),
    ),
    (
        "verify --report under a file",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx", "--report", "notes.json/r.json"],
        (3,),
    ),
    (
        "merge --out a long name",
        ["merge", "--base", "llama", "--adapter", "ad", "--out", "new/" + "x" * 250],
        (2,),
    ),
    (
        "train --data not UTF-8",
        ["train", "--base", "ref", "--data", "bad/not-utf8.jsonl", "--out", "t"],
        (3,),
    ),
    ("train --data 100,000 deep", ["train", "--base", "ref", "--data", "bad/deep.jsonl", "--out", "t"], (3,)),
    (
        "train --data 5,000 digits",
        ["train", "--base", "ref", "--data", "bad/digits.jsonl", "--out", "t"],
        (3,),
    ),
    (
        "verify --eval-data not UTF-8",
        [
            "verify",
            "--base",
            "llama",
            "--adapter",
            "ad",
            "--onnx",
            "onnx",
            "--eval-data",
            "bad/not-utf8.jsonl",
        ],
        (3,),
    ),
    (
        "merge-and-export --eval-data deep",
        [
            "merge-and-export",
            "--base",
            "llama",
            "--adapter",
            "ad",
            "--out",
            "m",
            "--eval-data",
            "bad/deep.jsonl",
        ],
        (3,),
    ),
    ("train --lr nan", ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--lr", "nan"], (2,)),
    ("train --lr -1", ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--lr", "-1"], (2,)),
    ("train --lr inf", ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--lr", "inf"], (2,)),
    (
        "train --seed 1e23",
        ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--seed", "1e23"],
        (2,),
    ),
    (
        "verify --threads 2^40",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx", "--threads", str(2**40)],
        (2,),
    ),
    (
        "train --rank 1e8",
        ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--rank", str(10**8)],
        (2,),
    ),
    (
        "train --rank 2000000",
        ["train", "--base", "ref", "--data", "data.jsonl", "--out", "t", "--rank", "2000000"],
        (2,),
    ),
    (
        "train --rank 60000 (> 128 wide)",
        [
            "train",
            "--base",
            "ref",
            "--data",
            "data.jsonl",
            "--eval-data",
            "data.jsonl",
            "--out",
            "t",
            "--rank",
            "60000",
        ],
        (3,),
    ),
    (
        "sweep --budget-rank 1e8",
        ["sweep", "--base", "ref", "--data", "data.jsonl", "--out", "s", "--budget-rank", str(10**8)],
        (2,),
    ),
    ("inspect: loraexport.json model: 5", ["inspect", "onnx-typed"], (3,)),
    ("ref config d_model/d_ff 16384", ["inspect", "ref-huge"], (3,)),
    ("ref config max_len 10^7", ["inspect", "ref-maxlen"], (3,)),
    ("ref config 5 heads in 128", ["inspect", "ref-heads"], (3,)),
    ("ref config 0 heads", ["inspect", "ref-zero-heads"], (3,)),
    ("ref config width a string", ["inspect", "ref-string"], (3,)),
    ("llama heads not dividing", ["inspect", "llama-heads"], (3,)),
    ("llama 0 heads", ["inspect", "llama-zero"], (3,)),
    ("llama width a string", ["inspect", "llama-string"], (3,)),
    ("llama architectures: 5", ["inspect", "llama-archs"], (3,)),
    (
        "tokenizer_class: 5",
        ["merge-and-export", "--base", "llama-tok", "--adapter", "ad", "--out", "m"],
        (3,),
    ),
    ("HF export --opset 99", ["export", "--model", "llama", "--out", "e", "--opset", "99"], (2,)),
    ("ref export --opset 99", ["export", "--model", "ref", "--out", "e", "--opset", "99"], (2,)),
    (
        "HF export --opset 21 (torchscript)",
        ["export", "--model", "llama", "--out", "e", "--opset", "21"],
        (3,),
    ),
    ("check-files: a file now a symlink", ["verify", "--check-files", "onnx-linked"], (4,)),
    (
        "train --lr 10 (diverges?)",
        [
            "train",
            "--base",
            "ref",
            "--data",
            "data.jsonl",
            "--eval-data",
            "data.jsonl",
            "--out",
            "t",
            "--lr",
            "10",
            "--steps",
            "30",
        ],
        (0, 3),
    ),
    ("5 GB adapter_config.json", ["merge", "--base", "llama", "--adapter", "ad-huge", "--out", "m"], (3,)),
    ("6 GB model.onnx", ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "onnx-huge"], (3,)),
    (
        "verify: ONNX of another model",
        ["verify", "--base", "llama", "--adapter", "ad", "--onnx", "ref-onnx"],
        (3,),
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", type=Path, default=REPO / "runs" / "do-no-harm")
    args = ap.parse_args()
    root = args.dir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    setup(root)
    hostile_files(root)
    bad = 0
    print(f"{'recipe':<40} {'exit':>4} {'lines':>5} {'inputs':>9} {'peak RSS':>9}  first line")
    for name, cmd, ok_codes in RECIPES:
        before = digest(root)
        t0 = time.perf_counter()
        code, lines, mb = run(root, cmd)
        for leftover in ("t", "m", "e", "s"):  # a recipe that succeeds may write its own output
            if code == 0:
                shutil.rmtree(root / leftover, ignore_errors=True)
        same = digest(root) == before
        good = code in ok_codes and (code == 0 or len(lines) == 1) and same and mb < RSS_LIMIT_MB
        bad += not good
        first = lines[0][:90] if lines else ""
        print(
            f"{name:<40} {code:>4} {len(lines):>5} {'identical' if same else 'CHANGED':>9} {mb:>6.0f} MB"
            f"  {first}{'' if good else '   <-- FAILS'}  ({time.perf_counter() - t0:.1f} s)"
        )
    print(f"\n{len(RECIPES) - bad} of {len(RECIPES)} recipes hold every rule")
    bad += not concurrent(root)
    return 1 if bad else 0


def concurrent(root: Path, rounds: int = 3) -> bool:
    """Two merge-and-export runs started together to one new --out: one exits 0, the other 3,
    and the output left passes verify --check-files."""
    ok = True
    for i in range(rounds):
        out = root / f"race-{i}"
        cmd = [BIN, "--quiet", "merge-and-export", "--base", "llama", "--adapter", "ad", "--out", out.name]
        procs = [
            subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = sorted((p.wait(), p.stderr.read().strip()) for p in procs)
        check = subprocess.run([BIN, "verify", "--check-files", out], capture_output=True, text=True)
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(f".{out.name}.")]
        good = [c for c, _ in results] == [0, 3] and check.returncode == 0 and not leftovers
        ok &= good
        print(
            f"race {i}: exits {[c for c, _ in results]}, loser: {results[1][1][:100]!r}; "
            f"check-files exit {check.returncode}; leftovers {leftovers}{'' if good else '   <-- FAILS'}"
        )
    return ok


if __name__ == "__main__":
    sys.exit(main())
