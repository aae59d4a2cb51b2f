"""`loraexport analyze` on a GPT-2-small-shaped model: the issue's "under 30 s" check.

Builds (once, in runs/bench-analyze/, never committed) a randomly initialised GPT-2 with
GPT-2 small's shapes (12 layers, 768 wide, 50257-token vocabulary) saved with
``save_pretrained``, and a random PEFT-format adapter (r=8 on ``c_attn``: 12 modules of
768 → 2304, Conv1D with fan_in_fan_out), then times the CLI command in a fresh process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

RANK, LAYERS, WIDTH = 8, 12, 768
LORAEXPORT = Path(sys.executable).parent / "loraexport"  # the installed console script


def build(root: Path) -> tuple[Path, Path]:
    import torch
    import transformers

    from loraexport.lora.adapter import Adapter
    from loraexport.lora.config import LoraConfig

    base, adapter = root / "gpt2-small-random", root / "adapter"
    if (base / "config.json").exists() and (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=LAYERS, n_embd=WIDTH, n_head=12))
    model.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    weights = {
        f"transformer.h.{i}.attn.c_attn": (
            torch.randn(RANK, WIDTH, generator=g) * 0.02,  # A (r, in)
            torch.randn(3 * WIDTH, RANK, generator=g) * 0.02,  # B (out, r)
        )
        for i in range(LAYERS)
    }
    cfg = LoraConfig(
        r=RANK, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    adapter.mkdir(parents=True)
    Adapter(cfg, weights).save(adapter)
    return base, adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("runs/bench-analyze"))
    args = p.parse_args()
    base, adapter = build(args.dir)
    cmd = [str(LORAEXPORT), "-q", "analyze", "--base", str(base), "--adapter", str(adapter)]
    cmd += ["--out", str(args.dir / "analysis"), "--force"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(
        f"loraexport analyze (GPT-2 small shape, r={RANK} on c_attn, {LAYERS} modules): "
        f"{time.perf_counter() - t0:.1f} s wall"
    )


if __name__ == "__main__":
    main()
