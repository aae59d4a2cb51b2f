"""A decoder whose weights exceed protobuf's 2 GB: export with external data, parity in ORT.

Builds (once, in runs/bench-large/, never committed) a random Llama-shaped float32 model of
~2.6 GB and a random LoRA adapter, then runs `loraexport export`, `loraexport
merge-and-export --no-latency` and the same with `--dtype bfloat16` on it (the model in memory),
then `export --stream` and `merge-and-export --stream --no-latency` (tensor by tensor, verified
against the layer-streamed reference, onnxruntime a few layers at a time), each in its own
process, and prints wall time, peak RSS (also as a multiple of the weights, and above the
interpreter's own baseline) and the parity verdict. `--streamed-only`: the last two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CONFIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=10,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def build(root: Path, config: dict = CONFIG, half: bool = False) -> None:
    """``root/base`` (a random Llama of ``config``, float16 with ``half``) and ``root/adapter`` (r=8
    on q and v), written once."""
    if (root / "adapter" / "adapter_model.safetensors").exists():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model = model.half() if half else model
    model.save_pretrained(root / "base", safe_serialization=True, max_shard_size="1GB")
    del model
    r, g = 8, torch.Generator().manual_seed(1)
    h = config["hidden_size"]
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        for n in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{n}"
            tensors[p + ".lora_A.weight"] = torch.randn(r, h, generator=g) * 0.02
            tensors[p + ".lora_B.weight"] = torch.randn(h, r, generator=g) * 0.02
    (root / "adapter").mkdir(parents=True)
    save_file(tensors, str(root / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )


def _measure(cmd: list[str]) -> tuple[int, float, float, str]:
    """Run ``cmd`` in a fresh process; (exit code, wall s, its peak RSS in GB, its output)."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(r.stdout + r.stderr[-2000:]); "
        "print('\\nPEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", probe, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - t0
    out, _, peak = proc.stdout.rpartition("\nPEAK ")
    return proc.returncode, wall, int(peak or 0) / 1e6, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-large"))
    ap.add_argument("--streamed-only", action="store_true", help="only the --stream rows (and the baseline)")
    args = ap.parse_args()
    build(args.dir)
    size = sum(f.stat().st_size for f in (args.dir / "base").glob("*.safetensors"))
    base, adapter = str(args.dir / "base"), str(args.dir / "adapter")
    stages = {
        "export (merge in memory + ONNX)": [
            str(BIN / "loraexport"), "export", "--model", base, "--adapter", adapter,
            "--out", str(args.dir / "out-export"), "--force",
        ],
        "merge-and-export --no-latency": [
            str(BIN / "loraexport"), "merge-and-export", "--base", base, "--adapter", adapter,
            "--out", str(args.dir / "out"), "--force", "--no-latency", "--samples", "2",
        ],
        "merge-and-export --dtype bfloat16 --no-latency": [
            str(BIN / "loraexport"), "merge-and-export", "--base", base, "--adapter", adapter,
            "--out", str(args.dir / "out-bf16"), "--force", "--no-latency", "--samples", "2",
            "--dtype", "bfloat16",
        ],
        "export --stream": [
            str(BIN / "loraexport"), "export", "--model", base, "--adapter", adapter,
            "--out", str(args.dir / "out-export-stream"), "--force", "--stream",
        ],
        "merge-and-export --stream --no-latency": [
            str(BIN / "loraexport"), "merge-and-export", "--base", base, "--adapter", adapter,
            "--out", str(args.dir / "out-stream"), "--force", "--no-latency", "--stream",
        ],
    }  # fmt: skip
    if args.streamed_only:
        stages = {k: v for k, v in stages.items() if "--stream" in k}
    # the interpreter with what the CLI imports (torch, transformers, onnx, onnxruntime), no weights
    baseline_cmd = [
        sys.executable,
        "-c",
        "import loraexport.cli, loraexport.pipeline, transformers, onnxruntime",
    ]
    _, _, baseline, _ = _measure(baseline_cmd)
    rows = []
    for name, cmd in stages.items():
        code, wall, peak, out = _measure(cmd)
        print(f"## {name}\n{out}\n")
        rows.append((name, code, wall, peak))
    print(f"weights {size / 1e9:.2f} GB (float32)")
    for out in ("out", "out-bf16", "out-stream"):
        d = args.dir / out
        files = {f.name: f.stat().st_size for f in d.iterdir()} if d.is_dir() else {}
        print(f"{out}: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in files.items() if v > 1e6))
    print(f"interpreter baseline (imports, no weights): {baseline:.2f} GB")
    print(
        "\n| stage | exit | wall | peak RSS | peak / weights | above baseline / weights |"
        "\n|---|---:|---:|---:|---:|---:|"
    )
    for name, code, wall, peak in rows:
        above = (peak - baseline) / (size / 1e9)
        print(
            f"| {name} | {code} | {wall:.0f} s | {peak:.2f} GB | {peak / (size / 1e9):.2f}x | {above:.2f}x |"
        )

    failed = [f"{name} (exit {code})" for name, code, _, _ in rows if code != 0]
    if failed:  # a row whose run failed measured nothing: the table is not a result
        sys.exit(f"FAILED: {', '.join(failed)}; its output is above")


if __name__ == "__main__":
    main()
