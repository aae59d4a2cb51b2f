"""The tensor arithmetic of the layer-streamed reference (``verify.streamed``): weights cast to a
compute dtype when a product reads them, a block of rows at a time when large; transformers'
RMSNorm and rotary half-rotation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

Weights = dict[str, torch.Tensor]


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by distinct tensors (a cast to the dtype a tensor already has is no copy)."""
    return sum({t.data_ptr(): t.nbytes for t in tensors}.values())


class Cast(dict):
    """A group's tensors in ``dtype``, each cast when it is read: a float64 stream never holds a
    float64 copy of a whole 7B layer (1.6 GB), only of the product it computes."""

    def __init__(self, stored: Weights, dtype: torch.dtype) -> None:
        super().__init__(stored)
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return super().__getitem__(name).to(self.dtype)

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __or__(self, other: dict) -> Cast:
        return Cast({**dict(self.items()), **other}, self.dtype)

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as read, before its cast."""
        return super().__getitem__(name)


# A cast larger than this is made a block of rows at a time (the product is the same rows): a
# float64 stream's lm_head of a 7B model would otherwise be one 1.05 GB copy.
CAST_BLOCK_BYTES = 128 * 2**20


def linear_blocks(x: torch.Tensor, w: Weights, name: str, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w[name], bias)``; a weight whose cast exceeds CAST_BLOCK_BYTES is cast and
    multiplied a block of output rows at a time."""
    if isinstance(w, Cast):
        weight = w.stored(name)
        row_bytes = weight.shape[-1] * w.dtype.itemsize
        if weight.dtype != w.dtype and weight.shape[0] * row_bytes > CAST_BLOCK_BYTES:
            step = max(1, CAST_BLOCK_BYTES // row_bytes)
            y = torch.cat(
                [F.linear(x, weight[i : i + step].to(w.dtype)) for i in range(0, len(weight), step)], -1
            )
            return y if bias is None else y + bias
    return F.linear(x, w[name], bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (normalizes in float32), except that float64 stays float64."""
    h = x if x.dtype == torch.float64 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x.chunk(2, dim=-1)[1], x.chunk(2, dim=-1)[0]), dim=-1)
