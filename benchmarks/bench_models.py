"""The models `make bench` measures: shapes, random bases and adapters, and what a pass costs.

A shape is built once into ``runs/bench/models/<name>/`` (random weights, fixed seeds,
``save_pretrained``) with a PEFT LoRA adapter saved by PEFT itself (``lora_B`` drawn at random
so the adapter changes the outputs); a later run reuses both when the shape is unchanged.
The real SmolLM2-135M comes from ``samples/real/prepare.py`` and is used where it lies.

Work counted (the same figures for every row of a model, so efficiency is comparable):
- FLOPs of a prompt pass: 2 · (weights of every matrix product, LM head included) per token
  whose logits are computed (the LM head) or that passes through the layers (the rest), plus
  attention 2 · 2 · layers · batch · T² · (heads · head_dim): Q·Kᵀ and A·V over the full T×T
  square, as the unfused graphs compute it (a causal kernel could skip half).
- Bytes of weights read per decoded token: every weight a matrix product reads (the LM head
  once, tied or not), norms and biases; embedding tables are looked up one row per token and
  not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REAL_DIR = Path("runs/real")
LORA_R, LORA_ALPHA = 8, 16


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    model_type: str  # "gpt2" | "llama"
    config: dict[str, Any]
    targets: tuple[str, ...]
    fan_in_fan_out: bool = False
    real: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


GPT2 = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
SMOLLM2 = dict(
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
# --quick: the same architectures, tiny (exports in a few seconds, passes in milliseconds)
GPT2_TINY = dict(
    n_layer=2, n_embd=128, n_head=4, vocab_size=2000, n_positions=1024, bos_token_id=1999, eos_token_id=1999
)
SMOLLM2_TINY = SMOLLM2 | dict(
    num_hidden_layers=2,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    vocab_size=2000,
    max_position_embeddings=1024,
)


def shapes(quick: bool) -> dict[str, Shape]:
    g, s = (GPT2_TINY, SMOLLM2_TINY) if quick else (GPT2, SMOLLM2)
    tiny = " (tiny, --quick)" if quick else ""
    return {
        "gpt2": Shape(
            "gpt2",
            f"GPT-2-small shape{tiny}",
            "gpt2",
            g,
            ("c_attn",),
            fan_in_fan_out=True,
        ),
        "smollm2": Shape(
            "smollm2",
            f"SmolLM2-135M shape{tiny}",
            "llama",
            s,
            ("q_proj", "v_proj"),
        ),
        "real": Shape("real", "SmolLM2-135M (real weights and adapter)", "llama", {}, (), real=True),
    }


def locate(shape: Shape, root: Path, real_dir: Path = REAL_DIR) -> tuple[Path, Path] | str:
    """(base dir, adapter dir), built when needed; for the real model, a reason when absent."""
    if shape.real:
        base, adapter = real_dir / "smollm2", real_dir / "smollm2-adapter"
        if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
            return base, adapter
        return (
            f"{base} not found: run `make install-real && python samples/real/prepare.py "
            f"--out {real_dir}` to add the real SmolLM2-135M"
        )
    return build(shape, root / shape.key)


def build(shape: Shape, root: Path) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base, adapter, stamp = root / "base", root / "adapter", root / "shape.json"
    wanted = json.dumps({"config": shape.config, "targets": shape.targets, "r": LORA_R}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return base, adapter
    torch.manual_seed(0)
    if shape.model_type == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape.config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape.config))
    model.save_pretrained(base)
    cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=list(shape.targets),
        fan_in_fan_out=shape.fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0 (no effect); a trained adapter has B ≠ 0
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft_model.save_pretrained(adapter)
    stamp.write_text(wanted)
    return base, adapter


def load_torch(base: Path, adapter: Path, merged: bool):
    """PEFT eager (unmerged) or ``merge_and_unload``; float32, eval mode, greedy without an end."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
    if merged:
        model = model.merge_and_unload()
    model.eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id = None, 0  # 64 tokens always, as onnxruntime's loop decodes
    return model


@dataclass
class Work:
    """What one prompt pass and one decoded token cost for a model (see the module's text)."""

    layers: int
    heads: int
    head_dim: int
    vocab: int
    hidden: int
    layer_matmul_params: int  # weights of the products inside the layers, per token
    weight_bytes_fp32: int  # per decoded token, float32 weights

    def prompt_flops(self, batch: int, seq: int, logit_positions: int | None = None) -> float:
        tokens = batch * seq
        lm = batch * (seq if logit_positions is None else logit_positions)
        attn = 4.0 * self.layers * batch * seq * seq * self.heads * self.head_dim
        return 2.0 * self.layer_matmul_params * tokens + 2.0 * self.vocab * self.hidden * lm + attn


def work_of(model) -> Work:
    """Counted on the merged torch model (PEFT's LoRA branches add r·(in+out) per target: <0.5%)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    cfg = model.config
    head = model.get_output_embeddings()
    embeddings = {
        m.weight.data_ptr()
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.weight.data_ptr() != head.weight.data_ptr()
    }
    layer_params = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head
    )
    seen: set[int] = set()
    nbytes = 0
    for p in model.parameters():
        if p.data_ptr() in seen or p.data_ptr() in embeddings:
            continue
        seen.add(p.data_ptr())
        nbytes += p.numel() * p.element_size()
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    return Work(
        layers=cfg.num_hidden_layers,
        heads=heads,
        head_dim=hidden // heads,
        vocab=head.weight.shape[0],
        hidden=hidden,
        layer_matmul_params=layer_params,
        weight_bytes_fp32=nbytes,
    )


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers a decoded token reads: all but tables only ``Gather`` looks up
    (embeddings), from the sizes the tensors declare (external data is not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    uses: dict[str, set[str]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, set()).add(f"{node.op_type}:{i}")
    total = 0
    for t in graph.initializer:
        if uses.get(t.name) and all(u == "Gather:0" for u in uses[t.name]):
            continue
        name = onnx.TensorProto.DataType.Name(t.data_type)
        bits = (
            4
            if name in ("INT4", "UINT4")
            else 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        )
        total += (int(np.prod(t.dims, dtype=np.int64)) * bits + 7) // 8
    return total
