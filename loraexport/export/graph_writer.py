"""The initializers and nodes of a graph written node by node (``export.fused``): each weight
stored once by name, in float32, half precision behind a ``Cast``, or quantized to ``MatMulNBits``
as it is made, and with a ``Sink`` appended to the external data file at once (nothing held)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from loraexport.core.enums import Precision
from loraexport.errors import ExportError
from loraexport.export.qformat import EMBEDDING, TIED, nbits_quantize
from loraexport.export.quantize import NBITS_ACCURACY_LEVEL, nbits_block
from loraexport.lora.merge import cast_checked

MS = "com.microsoft"
# MatMulNBits as export.quantize writes it (symmetric, its blocks (NBITS_BLOCK), int8 activations per
# block)
ELEMENT = {
    torch.float32: TensorProto.FLOAT,
    torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.uint8: TensorProto.UINT8,
    torch.int64: TensorProto.INT64,
    torch.int32: TensorProto.INT32,
}
HALF = {Precision.FLOAT16: torch.float16, Precision.BFLOAT16: torch.bfloat16}
BITS = {Precision.INT8: 8, Precision.INT4: 4}
ALIGN = 4096  # external tensors start on a page: onnxruntime can map them as they are


class Sink:
    """Initializers appended to ``model.onnx.data`` as they are made (page-aligned)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0

    def put(self, name: str, data: memoryview, element: int, dims: tuple[int, ...]) -> onnx.TensorProto:
        pad = -self.offset % ALIGN if len(data) >= ALIGN else -self.offset % 64
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(data)
        t = onnx.TensorProto(name=name, data_type=element, dims=list(dims))
        for key, value in (
            ("location", self.path.name),
            ("offset", str(self.offset)),
            ("length", str(len(data))),
        ):
            t.external_data.add(key=key, value=value)
        t.data_location = onnx.TensorProto.EXTERNAL
        self.offset += len(data)
        return t

    def close(self) -> None:
        self.f.close()


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


class Graph:
    """Nodes and initializers as they are written; constants are stored once by name.

    ``precision``: how the projections' weights are stored (float32, float16/bfloat16 behind a
    Cast, int8/int4 as MatMulNBits); LoRA branches, norms and biases stay float32. ``sink``: write
    each initializer to external data at once (else they are held and saved by ``_save``).
    ``on_bytes(n)``: called with the bytes of each tensor written (progress)."""

    def __init__(
        self,
        precision: Precision = Precision.FLOAT32,
        sink: Sink | None = None,
        on_bytes: Callable[[int], None] | None = None,
        block: int | None = None,
    ) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.nbytes = 0
        self.branches = 0  # LoRA branches written
        self.packed = {"qkv": 0, "mlp": 0}  # layers whose group is one packed MatMul
        self.precision, self.sink, self.on_bytes = precision, sink, on_bytes
        self.block = nbits_block(precision, block) if precision in BITS else None  # int8/int4
        self.quantized = {4: 0, 8: 0}  # MatMulNBits written, by bits
        # each projection's weight (``<name>.weight.T``, whatever it is stored as): the modules it
        # holds, as (Hugging Face path, output rows) in the order they are packed along N
        self.origins: dict[str, tuple[tuple[str, int], ...]] = {}

    def tensor(self, name: str, t: torch.Tensor) -> str:
        """``t`` as an initializer ``name`` (once); its element type is its dtype's."""
        if name in self.initializers:
            return name
        if t.dtype not in ELEMENT:
            raise ExportError(f"fused export: {name} is {t.dtype}, which the graph cannot store")
        data = _raw(t.detach().cpu())
        element, dims = ELEMENT[t.dtype], tuple(t.shape)
        if self.sink is not None and len(data) > 1024:
            self.initializers[name] = self.sink.put(name, data, element, dims)
        else:
            self.initializers[name] = onnx.TensorProto(
                name=name, data_type=element, dims=list(dims), raw_data=bytes(data)
            )
        self.nbytes += len(data)
        if self.on_bytes:
            self.on_bytes(len(data))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        return self.tensor(name, torch.from_numpy(np.array(array, order="C", copy=True)))

    def const(self, name: str, values, dtype: type) -> str:
        return self.weight(f"const.{name}", np.array(values, dtype))

    def op(self, op_type: str, inputs: list[str], outputs: str | list[str], domain: str = "", **attrs):
        """Append a node; returns its output name (or names, when given a list)."""
        names = [outputs] if isinstance(outputs, str) else outputs
        node_name = f"{next(n for n in names if n)}/{op_type}"
        self.nodes.append(helper.make_node(op_type, inputs, names, node_name, domain=domain or None, **attrs))
        return outputs

    def matmul(self, x: str, weight: torch.Tensor, name: str, wide: bool = False, parts: tuple = ()) -> str:
        """``x·Wᵀ`` in the graph's precision (``wide``: int4 keeps this one in 8 bits, as
        ``export.quantize`` keeps the MLP's down projections and the LM head); ``parts``: the
        modules whose weights ``weight`` holds (``origins``)."""
        out = f"{name}.out"
        self.origins.setdefault(f"{name}.weight.T", tuple(parts))  # set already: the embedding's too
        if self.precision in BITS:
            bits = 8 if wide or self.precision is Precision.INT8 else BITS[self.precision]
            return self._nbits(x, weight, name, bits)
        if self.precision in HALF:
            stored = self.tensor(f"{name}.weight.T", cast_checked(weight.T, HALF[self.precision], name))
            cast = self.op("Cast", [stored], f"{name}.weight.T.float", to=TensorProto.FLOAT)
            return self.op("MatMul", [x, cast], out)
        return self.op("MatMul", [x, self.tensor(f"{name}.weight.T", weight.T.to(torch.float32))], out)

    def embedding(self, table: torch.Tensor, ids: str, head: str | None, quantized: bool = True) -> str:
        """The rows of ``table`` (V, H) for ``ids``, float32. int8/int4: ``GatherBlockQuantized`` of
        8-bit codes in the graph's blocks (the precision the LM head keeps); ``head``: the name of the
        LM head whose weight *is* this table (tied), whose ``MatMulNBits`` then reads the same codes
        and scales (stored once); else the table is quantized on its own. Not ``quantized``, other
        precisions, and a hidden size that is not a whole number of blocks (the codes would be
        padded): ``Gather`` of the table as it is stored."""
        if not quantized or self.precision not in BITS or table.shape[1] % self.block:
            if self.precision in HALF:  # gathered in half precision, then cast: no float32 copy
                where = "model.embed_tokens.weight"
                half = self.tensor("embed_tokens.weight", cast_checked(table, HALF[self.precision], where))
                gathered = self.op("Gather", [half, ids], "embeddings.half")
                return self.op("Cast", [gathered], "embeddings", to=TensorProto.FLOAT)
            stored = self.tensor("embed_tokens.weight", table.to(torch.float32))
            return self.op("Gather", [stored, ids], "embeddings")
        vocab, hidden = table.shape
        name = head or "embed_tokens"
        parts = ((head, vocab), (EMBEDDING, TIED)) if head else ((EMBEDDING, vocab),)
        self.origins[f"{name}.weight.T"] = parts
        b, s, blocks = self._codes(table, name, 8)
        scales = self.op("Reshape", [s, self.const("embedding_scales_shape", [vocab, blocks, 1], np.int64)],
                         "embeddings.scales")  # fmt: skip
        rows = self.op(
            "GatherBlockQuantized", [b, ids, scales], "embeddings.blocks", domain=MS,
            gather_axis=0, quantize_axis=2, block_size=self.block, bits=8,
        )  # fmt: skip
        shape = self.const("embedding_shape", [0, 0, hidden], np.int64)
        return self.op("Reshape", [rows, shape], "embeddings")

    def _codes(self, weight: torch.Tensor, name: str, bits: int) -> tuple[str, str, int]:
        """``weight`` (N, K) quantized as MatMulNBits stores it (onnxruntime's own block quantizer,
        the one MatMulNBitsQuantizer calls; symmetric, no zero points: ``export.qformat``), once:
        (packed codes, scales, blocks), the names of tensors written already when ``name`` has them
        (a tied embedding's codes, read again by the LM head)."""
        b, s = f"{name}.weight.T_Q{bits}", f"{name}.weight.T_scales"
        if b not in self.initializers:
            # (K, N) contiguous, as the quantizer reads it; torch transposes in tiles on every core
            # (numpy's copy of a transposed view takes 3x as long on an LM head)
            wt = weight.to(torch.float32).T.contiguous().numpy()
            packed, scales = nbits_quantize(wt, bits, self.block)
            del wt
            self.tensor(b, torch.from_numpy(packed))
            self.tensor(s, torch.from_numpy(scales))
        return b, s, int(self.initializers[s].dims[1])

    def _nbits(self, x: str, weight: torch.Tensor, name: str, bits: int) -> str:
        """MatMulNBits of ``x`` and ``weight`` (N, K) in ``bits`` (``_codes``)."""
        n, k = weight.shape
        b, s, _ = self._codes(weight, name, bits)
        self.quantized[bits] += 1
        return self.op(
            "MatMulNBits", [x, b, s], f"{name}.out", domain=MS,
            K=k, N=n, bits=bits, block_size=self.block, accuracy_level=NBITS_ACCURACY_LEVEL,
        )  # fmt: skip
