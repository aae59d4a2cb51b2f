"""Hugging Face decoders (GPT-2, Llama, Mistral, Qwen2) with a KV cache, as a ``ModelFamily``.

One ``model.onnx``, under the names Optimum and onnxruntime-genai use, for the prompt (P = 0)
and each new token:
  input_ids (B,T), attention_mask (B,P+T), position_ids (B,T), past_key_values.{i}.key/value
  (B,KV,P,Dh) → logits (B,T,V), present.{i}.key/value (B,KV,P+T,Dh)

With --optimize (``export.optimize``) the same names, logits (B,1,V) for the last position,
and for Llama, Mistral and Qwen2 one key/value buffer per layer updated in place.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from loraexport.errors import ModelFormatError
from loraexport.models.base import Inputs, ParityCase
from loraexport.models.hf.common import (
    cache_dims,
    end_token_ids,
    max_positions,
    random_cases,
    text_config,
)
from loraexport.models.hf.family import hf_family
from loraexport.models.hf.tokenizer import DEFAULT_PROMPTS, encode
from loraexport.models.spec import GraphSpec
from loraexport.models.types import CAUSAL_TYPES, GPT2, OPTIMIZED_TYPES

# What ``train`` adapts by default: the query and value projections; GPT-2 computes q, k and v in
# one Conv1D (as PEFT's default target map has it)
TARGETS = {GPT2: ("c_attn",)}
QV_TARGETS = ("q_proj", "v_proj")
NEW_TOKENS = 32  # greedy tokens compared per prompt
# (batch, length, padding) of the parity cases: batch sizes 1, 2, 4; lengths 2 to 64
PARITY_SHAPES = [
    (1, 16, "none"),
    (4, 32, "left"),
    (2, 64, "right"),
    (1, 2, "none"),
    (4, 24, "right"),
    (2, 8, "left"),
]


# ---- the exported graph -------------------------------------------------------------------------
class CausalGraph(nn.Module):
    """Flat tensors in and out; the ``DynamicCache`` is built inside ``forward``."""

    def __init__(self, model: nn.Module, last_position: bool = False) -> None:
        super().__init__()
        self.model = model
        # --optimize: the LM head on the last position only (transformers' logits_to_keep)
        self.keep = {"logits_to_keep": 1} if last_position else {}

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        from transformers import DynamicCache

        pairs = [(past_flat[i], past_flat[i + 1]) for i in range(0, len(past_flat), 2)]
        cache = DynamicCache(ddp_cache_data=pairs)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **_cache_kwargs(self.model, cache),
            **self.keep,
        )
        present = [t for layer in _returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _cache_kwargs(model: nn.Module, cache) -> dict[str, Any]:
    """transformers 5 renamed ``past_key_values`` to ``cache``; pass whichever forward takes."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def _specs(model: nn.Module, last_position: bool = False) -> list[GraphSpec]:
    n, kv, hd = cache_dims(model)
    B, T, P = 2, 3, 4
    vocab = text_config(model).vocab_size
    batch = Dim("batch", min=1, max=1024)
    seq, past, total = (
        Dim("seq", min=1, max=8192),
        Dim("past", min=0, max=8192),
        Dim("total", min=1, max=16384),
    )
    args = (
        torch.randint(0, vocab, (B, T)),
        torch.ones(B, P + T, dtype=torch.long),
        torch.arange(P, P + T).repeat(B, 1),
        *[torch.randn(B, kv, P, hd) for _ in range(2 * n)],  # (B, KV, P, Dh) each
    )
    return [
        GraphSpec(
            name="model",
            module=CausalGraph(model, last_position),
            args=args,
            input_names=["input_ids", "attention_mask", "position_ids", *_kv_names("past_key_values", n)],
            output_names=["logits", *_kv_names("present", n)],
            dynamic_shapes=(
                {0: batch, 1: seq},
                {0: batch, 1: total},
                {0: batch, 1: seq},
                tuple({0: batch, 2: past} for _ in range(2 * n)),
            ),
        )
    ]


# ---- metadata, parity, generation ---------------------------------------------------------------
def _end_ids(model: nn.Module) -> list[int]:
    """Every end id of generation_config.json and config.json (``common.end_token_ids``)."""
    gen = getattr(model, "generation_config", None)
    return end_token_ids(getattr(gen, "eos_token_id", None), text_config(model).eos_token_id)


def _special_tokens(model: nn.Module) -> dict[str, int | None]:
    c, ends = text_config(model), _end_ids(model)
    return {"bos": c.bos_token_id, "eos": ends[0] if ends else None, "pad": c.pad_token_id}


def _meta(model: nn.Module) -> dict[str, Any]:
    """The runtime facts of a decoder: head counts named for what they are (attention heads,
    key/value heads: GQA shares one key/value head among several query heads), and what
    onnxruntime-genai's config needs (``export.genai``)."""
    n, kv, hd = cache_dims(model)
    c = text_config(model)
    return {
        "kind": "causal",
        "model_type": model.config.model_type,
        "special_tokens": _special_tokens(model),
        "eos_token_ids": _end_ids(model),
        "n_layers": n,
        "attention_heads": c.num_attention_heads,
        "kv_heads": kv,
        "head_dim": hd,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "context_length": max_positions(c),
    }


def _parity_cases(model: nn.Module, n: int, seed: int) -> list[ParityCase]:
    """Unpadded, left- and right-padded batches of ``PARITY_SHAPES``."""
    return random_cases(model, PARITY_SHAPES, n, seed)


def _prompts(
    model: nn.Module, tokenizer, sources: list[str] | None, n: int, seed: int
) -> list[tuple[Inputs, int]]:
    """Tokenised prompts (the given sources, else a few built-in ones) or, without a tokenizer,
    random token ids; batched by token length, so no prompt is padded. Prompts are cut so that
    prompt and new tokens fit the model's positions."""
    vocab = text_config(model).vocab_size
    if tokenizer is not None:
        try:
            seqs = [s for s in encode(tokenizer, list(sources or DEFAULT_PROMPTS), vocab) if s]
        except ModelFormatError as e:
            raise ModelFormatError(f"{Path(tokenizer.name_or_path) / 'tokenizer_config.json'}: {e}") from e
    else:
        rng = torch.Generator().manual_seed(seed)
        seqs = [
            torch.randint(0, vocab, (int(torch.randint(3, 12, (1,), generator=rng)),), generator=rng).tolist()
            for _ in range(min(n, 8))
        ]
    room = max_positions(text_config(model))
    new = min(NEW_TOKENS, room // 2)
    groups: dict[int, list[list[int]]] = {}
    for s in seqs:
        s = s[: room - new]
        groups.setdefault(len(s), []).append(s)
    out = []
    for _, group in sorted(groups.items()):
        ids = torch.tensor(group, dtype=torch.long)  # (B, T): one length per group, no padding
        out.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, new))
    return out


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def _generate(model: nn.Module, inputs: Inputs, max_new: int) -> torch.Tensor:
    """Greedy decoding with transformers' own ``DynamicCache`` (the torch reference)."""
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    cache = DynamicCache()
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=True,
        **_cache_kwargs(model, cache),
    )
    new = []
    for step in range(max_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        new.append(nxt)
        if step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(
            input_ids=nxt,
            attention_mask=mask,
            position_ids=_positions(mask)[:, -1:],
            use_cache=True,
            **_cache_kwargs(model, _returned_cache(out)),
        )
    return torch.cat(new, dim=1)  # (B, max_new)


HF_CAUSAL = hf_family(
    "hf-causal",
    CAUSAL_TYPES,
    encoder=False,
    graph_specs=_specs,
    runtime_meta=_meta,
    parity_cases=_parity_cases,
    prompts=_prompts,
    generate=_generate,
    latency_points=((1, 16), (1, 128)),
    optimized_specs=lambda model: _specs(model, last_position=True),
    optimizes=lambda cfg: cfg.get("model_type") in OPTIMIZED_TYPES,
    default_targets=lambda model: TARGETS.get(model.config.model_type, QV_TARGETS),
)
