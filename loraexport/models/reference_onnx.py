"""The reference Transformer as ONNX graphs: flat tensors in, flat tensors out.

Encoder-decoder → ``encoder.onnx`` + ``decoder.onnx``:
  encoder: input_ids (B,S), attention_mask (B,S)
        → last_hidden_state (B,S,D), encoder_key_values.{i}.key/value (B,H,S,Dh)
  decoder: input_ids (B,T), encoder_attention_mask (B,S), past_key_values.{i}.key/value (B,H,P,Dh),
           encoder_key_values.{i}.key/value (B,H,S,Dh)
        → logits (B,T,V), present.{i}.key/value (B,H,P+T,Dh)
Decoder-only → ``model.onnx``:
  input_ids (B,T), attention_mask (B,P+T), past_key_values.{i}.key/value
        → logits (B,T,V), present.{i}.key/value
The cross-attention cache is computed once, in the encoder graph; the self-attention cache
grows by T per call (P = 0 on the first call), so greedy decoding runs entirely in ORT.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from loraexport.models.spec import GraphSpec
from loraexport.models.transformer import Transformer


def _kv_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(n) for kind in ("key", "value")]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class EncoderGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        memory = self.model.encode(input_ids, attention_mask)
        flat = [t for kv in self.model.cross_kv(memory) for t in kv]
        return (memory, *flat)


class Seq2SeqDecoderGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n = model.config.n_decoder_layers

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor, *caches: torch.Tensor):
        past, cross = _pairs(caches[: 2 * self.n]), _pairs(caches[2 * self.n :])
        logits, present = self.model.decode(
            input_ids, past=past, cross=cross, encoder_attention_mask=encoder_attention_mask
        )
        return (logits, *[t for kv in present for t in kv])


class CausalGraph(nn.Module):
    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past_flat: torch.Tensor):
        logits, present = self.model.decode(input_ids, past=_pairs(past_flat), attention_mask=attention_mask)
        return (logits, *[t for kv in present for t in kv])


def graph_specs(model: Transformer) -> list[GraphSpec]:
    """The graphs to export for ``model`` with example inputs and dynamic axes."""
    c = model.config
    n, H, Dh = c.n_decoder_layers, c.n_heads, c.d_model // c.n_heads
    B, S, T, P = 2, 5, 3, 4  # example sizes; all distinct and >= 2 so none is specialised
    batch, src, new, past, total = (
        Dim("batch", min=1, max=1024),
        Dim("src_len", min=2, max=c.max_len),
        Dim("seq", min=1, max=c.max_len),
        Dim("past", min=0, max=c.max_len),
        Dim("total", min=1, max=2 * c.max_len),
    )
    ids = torch.randint(4, c.vocab_size, (B, T))
    kv = lambda L: torch.randn(B, H, L, Dh)  # noqa: E731
    self_names = _kv_names("past_key_values", n)
    present_names = _kv_names("present", n)
    if c.is_encoder_decoder:
        cross_names = _kv_names("encoder_key_values", n)
        enc = GraphSpec(
            name="encoder",
            module=EncoderGraph(model),
            args=(torch.randint(4, c.vocab_size, (B, S)), torch.ones(B, S, dtype=torch.long)),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", *cross_names],
            dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: src}),
        )
        dec = GraphSpec(
            name="decoder",
            module=Seq2SeqDecoderGraph(model),
            args=(
                ids,
                torch.ones(B, S, dtype=torch.long),
                *[kv(P) for _ in self_names],
                *[kv(S) for _ in cross_names],
            ),
            input_names=["input_ids", "encoder_attention_mask", *self_names, *cross_names],
            output_names=["logits", *present_names],
            dynamic_shapes=(
                {0: batch, 1: new},
                {0: batch, 1: src},
                (*[{0: batch, 2: past} for _ in self_names], *[{0: batch, 2: src} for _ in cross_names]),
            ),
        )
        return [enc, dec]
    return [
        GraphSpec(
            name="model",
            module=CausalGraph(model),
            args=(ids, torch.ones(B, P + T, dtype=torch.long), *[kv(P) for _ in self_names]),
            input_names=["input_ids", "attention_mask", *self_names],
            output_names=["logits", *present_names],
            dynamic_shapes=(
                {0: batch, 1: new},
                {0: batch, 1: total},
                tuple({0: batch, 2: past} for _ in self_names),
            ),
        )
    ]
