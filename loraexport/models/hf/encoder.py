"""Hugging Face encoders (BERT, RoBERTa) as a ``ModelFamily``.

One ``model.onnx``: input_ids, attention_mask, token_type_ids (B,T) → last_hidden_state
(B,T,H), or logits (B,labels) with a classification head. Encoders do not generate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.export import Dim

from loraexport.models.base import Inputs, ParityCase
from loraexport.models.hf.common import max_positions, random_cases
from loraexport.models.hf.family import hf_family
from loraexport.models.hf.tokenizer import encode
from loraexport.models.spec import GraphSpec
from loraexport.models.types import ENCODER_TYPES

# (batch, length, padding) of the parity cases: unpadded and right-padded (token_type_ids are
# fed as zeros by the runners)
PARITY_SHAPES = [(1, 16, "none"), (4, 32, "right"), (2, 64, "right"), (1, 2, "none"), (4, 24, "right")]
TEXT_BATCH = 8  # texts per case of ``_text_cases`` (right-padded to the batch's longest)


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return (getattr(out, self.output),)


def _output(model: nn.Module) -> str:
    return (
        "logits"
        if model.config.architectures
        and any(a.endswith("ForSequenceClassification") for a in model.config.architectures)
        and hasattr(model, "classifier")
        else "last_hidden_state"
    )


def _specs(model: nn.Module) -> list[GraphSpec]:
    B, S = 2, 5
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=max_positions(model.config))
    ids = torch.randint(0, model.config.vocab_size, (B, S))
    out = _output(model)
    return [
        GraphSpec(
            name="model",
            module=EncoderGraph(model, out),
            args=(ids, torch.ones(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=[out],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: seq}),
        )
    ]


def _meta(model: nn.Module) -> dict[str, Any]:
    return {
        "kind": "encoder",
        "model_type": model.config.model_type,
        "output": _output(model),
        "special_tokens": {"pad": model.config.pad_token_id},
        "vocab_size": model.config.vocab_size,
        "context_length": max_positions(model.config),
    }


def _parity_cases(model: nn.Module, n: int, seed: int) -> list[ParityCase]:
    return random_cases(model, PARITY_SHAPES, n, seed)


def _text_cases(model: nn.Module, tokenizer, texts: list[str]) -> list[ParityCase]:
    """``texts`` tokenised as the model reads them (special tokens included, cut to its positions),
    in right-padded batches of ``TEXT_BATCH``; every real token's output is compared."""
    room = max_positions(model.config)
    seqs = [s[:room] for s in encode(tokenizer, texts, model.config.vocab_size) if s]
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    cases = []
    for start in range(0, len(seqs), TEXT_BATCH):
        group = seqs[start : start + TEXT_BATCH]
        width = max(2, *(len(s) for s in group))  # the graph's sequence axis starts at 2
        ids = torch.full((len(group), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(group):
            ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        cases.append(ParityCase(f"text-{start // TEXT_BATCH}", inputs, mask.bool()))
    return cases


def _no_prompts(model: nn.Module, tokenizer, sources: list[str] | None, n: int, seed: int) -> list:
    return []


def _no_generation(model: nn.Module, inputs: Inputs, max_new: int) -> torch.Tensor:
    raise NotImplementedError("encoders do not generate")


HF_ENCODER = hf_family(
    "hf-encoder",
    ENCODER_TYPES,
    encoder=True,
    graph_specs=_specs,
    runtime_meta=_meta,
    parity_cases=_parity_cases,
    prompts=_no_prompts,
    text_cases=_text_cases,
    generate=_no_generation,
    latency_points=((1, 16), (1, 128), (8, 128)),
    default_targets=lambda model: ("query", "value"),
)
