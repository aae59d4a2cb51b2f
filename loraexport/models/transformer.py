"""The reference Transformer of *Attention Is All You Need* (Vaswani et al., 2017).

Read top to bottom: attention → feed-forward → layers → config → model. Post-LN residual
blocks (§3.1), scaled dot-product attention (§3.2.1), multi-head attention with separate
``q``, ``k``, ``v``, ``o`` projections (§3.2.2; plain ``nn.Linear`` so LoRA can target them
by name), position-wise feed-forward (§3.3), embeddings scaled by √d_model (§3.4) and
sinusoidal positional encoding (§3.5). An encoder-decoder or a decoder-only stack.

Incremental decoding keeps a key/value cache per decoder layer as plain tensors
``(B, H, T, Dh)``; the cross-attention cache is computed once from the encoder output.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from loraexport.core.untrusted import short_repr

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (B, H, T, Dh)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d_k)·V. ``mask`` is True where attention is allowed, broadcast to scores."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1) @ v  # (B, H, Tq, Dh)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: torch.Tensor) -> KV:
        return self.split(self.k(x)), self.split(self.v(x))

    def forward(self, x: torch.Tensor, kv: KV, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, D = x.shape
        y = scaled_dot_product_attention(self.split(self.q(x)), kv[0], kv[1], mask)  # (B, H, T, Dh)
        return self.o(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.ff = FeedForward(d_model, d_ff)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.self_attn(x, self.self_attn.project_kv(x), mask)))
        return self.norm2(x + self.drop(self.ff(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, then (encoder-decoder only) cross-attention, then feed-forward."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.cross_attn = MultiHeadAttention(d_model, n_heads) if cross else None
        self.ff = FeedForward(d_model, d_ff)
        self.norm1, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model) if cross else None
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor,
        past: KV | None,
        cross_kv: KV | None,
        cross_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KV]:
        k, v = self.self_attn.project_kv(x)  # (B, H, T_new, Dh)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H, T_past+T_new, Dh)
        x = self.norm1(x + self.drop(self.self_attn(x, (k, v), self_mask)))
        if self.cross_attn is not None:
            x = self.norm2(x + self.drop(self.cross_attn(x, cross_kv, cross_mask)))
        return self.norm3(x + self.drop(self.ff(x))), (k, v)


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...). Shape (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angle = pos * div  # (max_len, ⌈d_model/2⌉), float64; rounded to float32 once, when stored
    pe = torch.empty(max_len, d_model)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe


# (name, lowest, highest) of every integer field; see ``TransformerConfig.__post_init__``.
LIMITS = (
    ("d_model", 1, 2**16),
    ("n_heads", 1, 2**16),
    ("d_ff", 1, 2**18),
    ("n_encoder_layers", 0, 256),  # 0 means decoder-only
    ("n_decoder_layers", 1, 256),
    ("max_len", 1, 2**20),
)


@dataclass
class TransformerConfig:
    """Hyper-parameters, serialised as ``config.json`` beside ``model.safetensors``."""

    vocab: list[str] = field(default_factory=list)  # token strings; ids are their indices
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_encoder_layers: int = 2  # 0 means decoder-only
    n_decoder_layers: int = 2
    max_len: int = 64
    dropout: float = 0.0
    model_type: str = "loraexport-transformer"

    def __post_init__(self) -> None:
        """Types and ranges: a config.json is untrusted, and a value outside these bounds is a
        mistake (or an attack), never a model (the paper's largest: d_model 1024, d_ff 4096, 6+6
        layers). The bounds keep every size product far from int64 overflow."""
        if not isinstance(self.vocab, list) or not all(isinstance(t, str) for t in self.vocab):
            raise ValueError(f"vocab must be a list of token strings, got {short_repr(self.vocab)}")
        for name, low, high in LIMITS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {short_repr(value)}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout must be a number in [0, 1), got {short_repr(self.dropout)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.n_encoder_layers > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TransformerConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(short_repr(k) for k in unknown[:8])}")
        return cls(**data)


class Transformer(nn.Module):
    """Encoder-decoder (``n_encoder_layers > 0``) or decoder-only Transformer."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.register_buffer("pe", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(c.d_model, c.n_heads, c.d_ff, c.dropout, cross=c.is_encoder_decoder)
            for _ in range(c.n_decoder_layers)
        )
        self.lm_head = nn.Linear(c.d_model, c.vocab_size)

    def embed_tokens(self, ids: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
        T = ids.shape[1]
        pos = self.pe[offset : offset + T]  # (T, D)
        return self.drop(self.embed(ids) * math.sqrt(self.config.d_model) + pos)  # (B, T, D)

    # ---- encoder ----------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids and 0/1 mask → encoder output (B, S, D)."""
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed_tokens(input_ids)
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def cross_kv(self, memory: torch.Tensor) -> list[KV]:
        """Each decoder layer's cross-attention keys/values, computed once per source."""
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder]

    # ---- decoder ----------------------------------------------------------------------
    def decode(
        self,
        input_ids: torch.Tensor,
        past: list[KV] | None = None,
        cross: list[KV] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """One decoder pass over ``input_ids`` (B, T) after ``past`` tokens.

        Args:
            input_ids: new tokens (B, T).
            past: per layer (key, value) of the previous tokens, (B, H, P, Dh); None at the start.
            cross: per layer cross-attention (key, value) from ``cross_kv`` (encoder-decoder only).
            encoder_attention_mask: (B, S) 0/1 mask of the source (encoder-decoder only).
            attention_mask: (B, P+T) 0/1 mask of past and new tokens (decoder-only padding).

        Returns:
            logits (B, T, V) and the updated cache, per layer (B, H, P+T, Dh).
        """
        T = input_ids.shape[1]
        P = 0 if past is None else past[0][0].shape[2]
        q_pos = torch.arange(T, device=input_ids.device) + P
        k_pos = torch.arange(P + T, device=input_ids.device)
        self_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, P+T) causal
        if attention_mask is not None:
            self_mask = self_mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, P+T)
        cross_mask = None
        if encoder_attention_mask is not None:
            cross_mask = encoder_attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed_tokens(input_ids, P)
        present: list[KV] = []
        for i, layer in enumerate(self.decoder):
            x, kv = layer(
                x,
                self_mask,
                None if past is None else past[i],
                None if cross is None else cross[i],
                cross_mask,
            )
            present.append(kv)
        return self.lm_head(x), present

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full recomputation (training, reference): logits (B, T, V) of the decoder.

        Encoder-decoder: ``input_ids``/``attention_mask`` are the source, ``decoder_input_ids``
        the shifted target. Decoder-only: ``input_ids`` is the sequence, ``attention_mask`` its
        padding mask.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids")
            memory = self.encode(input_ids, attention_mask)
            logits, _ = self.decode(
                decoder_input_ids, cross=self.cross_kv(memory), encoder_attention_mask=attention_mask
            )
            return logits
        logits, _ = self.decode(input_ids, attention_mask=attention_mask)
        return logits
