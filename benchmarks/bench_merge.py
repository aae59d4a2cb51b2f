"""`make bench-merge`: streaming merge vs PEFT's load → merge_and_unload → save_pretrained.

Builds (once, in runs/bench-merge/, never committed) a synthetic Llama-shaped float16 checkpoint
of ~4.2 GB in 1 GB shards with random weights, and a LoRA adapter (r=16 on q_proj, v_proj),
then runs both merges on the same files, each in its own process, and prints wall time, peak
RSS and bytes per second side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, VOCAB, HEADS = 4096, 11008, 9, 32000, 32
SHARD_BYTES = 1_000_000_000
BIN = Path(sys.executable).parent


def build(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    base, adapter = root / "base", root / "adapter"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_model.safetensors").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n, s in (
            ("self_attn.q_proj", (HIDDEN, HIDDEN)),
            ("self_attn.k_proj", (HIDDEN, HIDDEN)),
            ("self_attn.v_proj", (HIDDEN, HIDDEN)),
            ("self_attn.o_proj", (HIDDEN, HIDDEN)),
            ("mlp.gate_proj", (INTER, HIDDEN)),
            ("mlp.up_proj", (INTER, HIDDEN)),
            ("mlp.down_proj", (HIDDEN, INTER)),
        ):
            shapes[p + n + ".weight"] = s
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shard, size, n_shard, weight_map = {}, 0, 1, {}

    def flush():
        nonlocal shard, size, n_shard
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, n_shard = {}, 0, n_shard + 1

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).half()
        if size + t.numel() * 2 > SHARD_BYTES and shard:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    total = sum((base / f).stat().st_size for f in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (base / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": HIDDEN,
                "intermediate_size": INTER,
                "num_hidden_layers": LAYERS,
                "num_attention_heads": HEADS,
                "num_key_value_heads": HEADS,
                "vocab_size": VOCAB,
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "torch_dtype": "float16",
            }
        )
    )
    adapter.mkdir()
    r = 16
    tensors = {}
    for i in range(LAYERS):
        for n in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{n}"
            tensors[p + ".lora_A.weight"] = torch.randn(r, HIDDEN, generator=g) * 0.01
            tensors[p + ".lora_B.weight"] = torch.randn(HIDDEN, r, generator=g) * 0.01
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 32,
                "target_modules": ["q_proj", "v_proj"],
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": False,
                "task_type": "CAUSAL_LM",
            }
        )
    )


PEFT_PATH = """
import sys, time, resource, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16, local_files_only=True)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3], safe_serialization=True, max_shard_size="1GB")
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
"""

STREAM_PATH = """
import sys, time, resource
from loraexport.stages.merge import merge
t = time.perf_counter()
merge(sys.argv[1], [sys.argv[2]], sys.argv[3], force=True, show_progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)
"""


def run(code: str, *args: str) -> tuple[float, float]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    seconds, rss = proc.stdout.split()[-2:]
    return float(seconds), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-merge"))
    ap.add_argument("--repeat", type=int, default=3, help="runs of each path; the median is reported")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build(args.dir)
    base, adapter = args.dir / "base", args.dir / "adapter"
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(
        f"checkpoint: {size / 1e9:.2f} GB in {len(list(base.glob('*.safetensors')))} shards "
        f"(ready in {time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
    )
    paths = {
        "loraexport merge (streaming)": STREAM_PATH,
        "PEFT load → merge_and_unload → save_pretrained": PEFT_PATH,
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.repeat):  # the two paths alternate, so both see the same machine state
        for name, code in paths.items():
            out = args.dir / "out"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            runs[name].append(run(code, str(base), str(adapter), str(out)))
            shutil.rmtree(out, ignore_errors=True)
    rows = []
    for name, results in runs.items():
        seconds = statistics.median(s for s, _ in results)
        rss = max(r for _, r in results)
        rows.append((name, seconds, rss, size / seconds / 1e6))
        print(f"{name}: " + ", ".join(f"{s:.1f} s" for s, _ in results), file=sys.stderr)
    print(
        f"\nmerge of a {size / 1e9:.2f} GB float16 checkpoint (9 Llama-7B-shaped layers), LoRA r=16 on q/v\n"
    )
    print(
        f"| path | median wall s of {args.repeat} | peak RSS GB | MB/s (checkpoint bytes / median wall) |"
        "\n|---|---:|---:|---:|"
    )
    for name, s, rss, mbps in rows:
        print(f"| {name} | {s:.1f} | {rss:.2f} | {mbps:.0f} |")
    _ = resource  # (peak RSS is measured inside each child)


if __name__ == "__main__":
    main()
