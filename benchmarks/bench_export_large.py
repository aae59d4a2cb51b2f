"""A decoder whose weights exceed protobuf's 2 GB: export with external data, parity in ORT.

Builds (once, in runs/bench-large/, never committed) a random Llama-shaped float32 model of
~2.6 GB and a random LoRA adapter, then runs `loraexport merge-and-export --no-latency` on it
and prints wall time, peak RSS and the parity verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def build(root: Path) -> None:
    if (root / "adapter" / "adapter_model.safetensors").exists():
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    model.save_pretrained(root / "base", safe_serialization=True, max_shard_size="1GB")
    del model
    r, g = 8, torch.Generator().manual_seed(1)
    h = CONFIG["hidden_size"]
    tensors = {}
    for i in range(CONFIG["num_hidden_layers"]):
        for n in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{i}.self_attn.{n}"
            tensors[p + ".lora_A.weight"] = torch.randn(r, h, generator=g) * 0.02
            tensors[p + ".lora_B.weight"] = torch.randn(h, r, generator=g) * 0.02
    (root / "adapter").mkdir(parents=True)
    save_file(tensors, str(root / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("runs/bench-large"))
    args = ap.parse_args()
    build(args.dir)
    size = sum(f.stat().st_size for f in (args.dir / "base").glob("*.safetensors"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            str(BIN / "loraexport"),
            "merge-and-export",
            "--base",
            str(args.dir / "base"),
            "--adapter",
            str(args.dir / "adapter"),
            "--out",
            str(args.dir / "out"),
            "--force",
            "--no-latency",
            "--samples",
            "2",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(proc.stdout or proc.stderr[-2000:])
    files = {f.name: f.stat().st_size for f in (args.dir / "out").iterdir()} if proc.returncode == 0 else {}
    print(
        f"weights {size / 1e9:.2f} GB; exit {proc.returncode}; {wall:.0f} s; peak RSS {rss:.1f} GB; files "
        + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in files.items() if v > 1e6)
    )


if __name__ == "__main__":
    main()
