"""The two concepts every stage shares, named once: what an export holds (``ExportMode``) and
in which precision weights are stored (``Precision``).

The CLI's choices, ``loraexport.json``'s ``"mode"`` and ``"weights_dtype"``, the export and
verify stages and ``loraexport.runtime`` all use these values. No torch here (the runtime and
the CLI import it); ``loraexport.core.dtypes`` maps them to torch and ONNX types.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from loraexport.errors import InvalidInputError


class ExportMode(str, Enum):
    """What the exported graph holds."""

    MERGED = "merged"  # W0 + Σ w·s·B·A baked into the weights: the fastest graph for one adapter
    UNMERGED = "unmerged"  # the LoRA branches kept in the graph, their A and B as constants
    ADAPTER = "adapter"  # the LoRA branches kept, A and B graph inputs: adapters per request
    BASE = "base"  # no adapter given: the base model as it is

    @classmethod
    def choices(cls) -> list[str]:
        """The modes a user may ask for (``base`` is what an export without adapters is)."""
        return [m.value for m in cls if m is not cls.BASE]

    @classmethod
    def parse(cls, value: Any) -> ExportMode:
        try:
            return cls(value)
        except ValueError:
            raise InvalidInputError(
                f"mode must be one of {', '.join(cls.choices())}, got {value!r}"
            ) from None


class Precision(str, Enum):
    """How weights are stored: float32; half precision behind a lossless Cast to float32
    (``--dtype``); or quantized, computing in integers (``--quantize``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT8 = "int8"  # weight-only MatMulNBits, 8 bits in blocks (activations int8 per block)
    INT8_DYNAMIC = "int8-dynamic"  # quantize_dynamic's int8 weights, activations int8 per token
    INT4 = "int4"  # weight-only MatMulNBits, 4 bits in blocks

    @classmethod
    def choices(cls, kind: str = "float", *, half_only: bool = False) -> list[str]:
        """``float`` (the --dtype choices), ``half``, ``quantized`` (the --quantize choices), ``all``."""
        kind = "half" if half_only else kind
        keep = {
            "float": lambda p: not p.is_quantized,
            "half": lambda p: p.is_half,
            "quantized": lambda p: p.is_quantized,
            "all": lambda p: True,
        }[kind]
        return [p.value for p in cls if keep(p)]

    @classmethod
    def parse(cls, value: Any) -> Precision:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise InvalidInputError(
                f"unknown dtype {value!r}; choose from {', '.join(cls.choices('all'))}"
            ) from None

    @property
    def is_half(self) -> bool:
        return self in (Precision.FLOAT16, Precision.BFLOAT16)

    @property
    def is_quantized(self) -> bool:
        return self in (Precision.INT8, Precision.INT8_DYNAMIC, Precision.INT4)


def quantization(value: str | Precision | None) -> Precision | None:
    """The quantization named by ``value``; None for a float precision or None."""
    if value is None:
        return None
    p = Precision.parse(value)
    return p if p.is_quantized else None


def half_precision(value: str | Precision | None) -> Precision | None:
    """The half precision named by ``value``; None for float32 or None (no rounding)."""
    if value is None:
        return None
    p = Precision.parse(value)
    return p if p.is_half else None


# The largest LoRA rank ``--mode adapter`` builds a graph for (``--max-rank``): past this it is
# no low-rank adapter, and the zero defaults alone would be as large as the weights they adapt.
MAX_LORA_RANK = 4096
# --block-size: the int8/int4 block sizes a user may choose (MatMulNBits: powers of two from 16)
NBITS_BLOCKS = (16, 32, 64, 128)
