"""The quantized tensor formats loraexport writes, both ways: a float weight to its stored form
(with onnxruntime's own block quantizer, the one ``MatMulNBitsQuantizer`` calls), and a stored form
back to the float values a kernel computes with. Used by the writer (``export.graph_writer``), by
verify's weight-level proof (``verify.proof``) and by its dequantized reference
(``verify.dequantized``). No torch here.

- ``MatMulNBits`` (int8, int4; symmetric, blocks along K): ``B`` (N, blocks, block·bits/8) uint8,
  codes packed low nibble first for 4 bits; ``scales`` (N, blocks) float32; no zero points, so a
  code's zero is the middle of its range (8, or 128). ``w[k, n] = (code − zero) · scale[n, k // block]``.
- ``GatherBlockQuantized`` (the input embedding of a fused int8/int4 decoder): the same 8-bit codes
  and scales as a MatMulNBits weight (N = vocabulary, K = hidden), read as (V, blocks, block) with
  the scales reshaped to (V, blocks, 1); a tied LM head's MatMulNBits reads the very same tensors.
- ``quantize_dynamic`` (int8-dynamic): ``W_quantized`` (K, N) int8, ``W_scale`` (N,) float32 and
  ``W_zero_point`` (N,) int8 per output channel: ``w[k, n] = (q − zp[n]) · scale[n]``; its
  activations quantized per token at run time (``export.dynamic.per_token_activations``), a chain
  ``per_token_input`` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The module a ``GatherBlockQuantized`` table holds (the input embedding of the decoders
# ``export.fused`` writes), and the rows a module is given in ``origins`` when it holds the same
# rows as the module before it: a tied embedding, whose codes the LM head's MatMulNBits reads too.
EMBEDDING = "model.embed_tokens"
TIED = 0

# What the quantizers append to a float initializer's name, by the role of the tensor made.
NBITS_SUFFIXES = {"_Q4": "weight", "_Q8": "weight", "_scales": "scales", "_zero_points": "zero_points"}
DYNAMIC_SUFFIXES = {"_quantized": "weight", "_scale": "scales", "_zero_point": "zero_points"}


@dataclass(frozen=True)
class NBits:
    """One MatMulNBits weight's format, from the node's attributes."""

    k: int
    n: int
    bits: int
    block: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block)

    @property
    def zero(self) -> int:
        return 1 << (self.bits - 1)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(packed weight, scales) shapes."""
        return (self.n, self.blocks, self.block * self.bits // 8), (self.n, self.blocks)


def nbits_quantize(wt: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``wt`` (K, N) float32 as MatMulNBits stores it: (packed uint8, scales float32), symmetric."""
    from onnxruntime.capi import _pybind_state as ort_c

    wt = np.ascontiguousarray(wt, dtype=np.float32)
    k, n = wt.shape
    fmt = NBits(k, n, bits, block)
    if fmt.blocks * block != k:
        wt = np.pad(wt, ((0, fmt.blocks * block - k), (0, 0)))
    packed_shape, scales_shape = fmt.shapes()
    packed = np.zeros(packed_shape, np.uint8)
    scales = np.zeros(scales_shape, np.float32)
    zero = np.zeros((n, -(-fmt.blocks // (8 // bits))), np.uint8)
    quantize = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    quantize(packed, wt, scales, zero, block, n, k, True)
    return packed, scales


def nbits_codes(packed: np.ndarray, fmt: NBits) -> np.ndarray:
    """The integer codes (N, blocks·block) of a packed MatMulNBits weight (padding included)."""
    flat = np.asarray(packed, np.uint8).reshape(fmt.n, fmt.blocks, -1)
    if fmt.bits == 4:
        codes = np.stack([flat & 15, flat >> 4], axis=-1)
    else:
        codes = flat
    return codes.reshape(fmt.n, fmt.blocks * fmt.block).astype(np.int16)


def nbits_dequantize(packed: np.ndarray, scales: np.ndarray, fmt: NBits) -> np.ndarray:
    """The float32 weight (K, N) a MatMulNBits node computes with at accuracy level 0: each code
    minus the zero, times its block's scale (one float32 product, as onnxruntime rounds it)."""
    codes = nbits_codes(packed, fmt).reshape(fmt.n, fmt.blocks, fmt.block)
    s = np.asarray(scales, np.float32).reshape(fmt.n, fmt.blocks, 1)
    w = (codes - fmt.zero).astype(np.float32) * s  # (N, blocks, block)
    return np.ascontiguousarray(w.reshape(fmt.n, -1)[:, : fmt.k].T)


def dynamic_dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The float32 weight (K, N) of a ``quantize_dynamic`` weight, per output channel (axis 1)."""
    q = np.asarray(q).astype(np.float32)
    zp = np.asarray(zero_point).astype(np.float32).reshape(1, -1)
    return np.ascontiguousarray((q - zp) * np.asarray(scale, np.float32).reshape(1, -1))


def source_of(name: str) -> tuple[str, str] | None:
    """(the float initializer a quantized tensor was made from, its role), or None: from the
    names onnxruntime's quantizers (and ``export.graph_writer``) give what they make."""
    for suffixes in (NBITS_SUFFIXES, DYNAMIC_SUFFIXES):
        for suffix, role in suffixes.items():
            if name.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)], role
    return None


def per_token_input(codes: str, producer: dict) -> str | None:
    """The float activation whose per-token codes are ``codes`` (the chain ``Div → Round → Add →
    Cast`` that ``export.dynamic.per_token_activations`` writes, read back through ``producer``:
    output name → ONNX node), or None when ``codes`` is not made so."""
    name = codes
    for op in ("Cast", "Add", "Round", "Div"):
        node = producer.get(name)
        if node is None or node.op_type != op or not node.name.endswith(f"/per_token/{op}"):
            return None
        name = node.input[0]
    return name
