"""The proof stage: a quantized export, weight by weight, against the export the reference makes
(``verify.proof``), for a model in memory or a checkpoint read tensor by tensor; then the graphs
computing in float32 (``verify.dequantized``) for parity by arithmetic.

The reference is what ``verify`` was given: the base and adapters at the weights asked for, merged
in float64 and rounded once (a merged export), or the base with the adapter kept beside it
(``--keep-adapter``, adapter mode). It is exported again as ``loraexport.json`` says the file was:
a graph loraexport writes itself is compared as it is written, tensor by tensor; any other is
exported into a scratch folder and compared there. ``loraexport.json``'s claims (the model's
facts, the quantizer's settings, adapter mode's inputs) must be those of the export made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from loraexport.artifact.schema import BUILDER, graph_files
from loraexport.core.enums import ExportMode, Precision
from loraexport.errors import InvalidInputError
from loraexport.export.adapter import ADAPTER_SUFFIX
from loraexport.export.fused import build_fused_graph
from loraexport.export.fused_source import ModuleSource
from loraexport.export.quantize import lora_matmuls, quantized_proto, recorded_block
from loraexport.runtime.adapters import Active
from loraexport.runtime.files import RuntimeInputError
from loraexport.spec import ExportSpec
from loraexport.stages.float_graphs import FloatGraphs, link_or_copy
from loraexport.stages.graphs import Subject, export_into, export_subject, torch_exporter_of
from loraexport.stages.inputs import Loaded, Log
from loraexport.verify.chunked import scratch_dir
from loraexport.verify.dequantized import (
    dequantized_copy,
    dequantized_weights,
    float_compute_graph,
    float_origins,
    weight_index,
)
from loraexport.verify.proof import (
    CompareSink,
    FileProof,
    Origins,
    Proof,
    check_claims,
    compare_graph,
    compare_initializers,
)
from loraexport.verify.scoped import scoped_float_graph
from loraexport.verify.tensorfile import TensorFile, tensor_array

# loraexport.json's claims a reader acts on, which the export made again must repeat
SCOPED = (
    "the file's float graph rebuilt from its node and tensor names (torch.onnx's module scopes) with "
    "the reference's weights, quantized again as loraexport.json says and compared tensor by tensor; "
    "every linear module and parameter taken once; the wiring is judged by parity"
)
CLAIMS = ("model", "weights_dtype", "mode", "quantization", "graphs", "lora_inputs")
NBITS = (Precision.INT8, Precision.INT4)
PROVEN_WRITTEN = (*NBITS, Precision.FLOAT32, Precision.FLOAT16, Precision.BFLOAT16)  # the fused graph's


@dataclass
class Proven:
    """A proof, the modules each file's quantized weights hold, and the reference proven against."""

    proof: Proof
    origins: dict[str, Origins] = field(default_factory=dict)  # by graph file name
    subject: Subject | None = None


def prove_export(
    loaded: Loaded, onnx_dir: Path, meta: dict, log: Log, made: FloatGraphs | None = None
) -> Proven:
    """The proof of the export ``onnx_dir`` (``meta``; quantized, or float: ``stages.verify.proves``)
    against the reference ``loaded`` gives. ``made``: the float graphs this run exported (``meta``
    then describes this run's export). Raises ``InvalidInputError`` for files that cannot be read."""
    precision = Precision.parse(meta.get("weights_dtype", "float32"))
    mode = ExportMode.parse(meta.get("mode", "merged"))
    lora = meta.get("lora_inputs") if isinstance(meta.get("lora_inputs"), dict) else {}
    rank = lora.get("rank") if isinstance(lora.get("rank"), int) else None
    subject = export_subject(loaded, mode, precision, rank)
    block = recorded_block(meta)  # a block size loraexport.json claims falsely fails _claims
    t0 = time.perf_counter()
    try:
        if meta.get("exporter") == BUILDER and precision in PROVEN_WRITTEN and mode is not ExportMode.ADAPTER:
            log(f"proof: writing the {precision.value} graph of the reference again, tensor by tensor …")
            proven = _prove_written(ModuleSource(subject.model), onnx_dir / "model.onnx", precision, block)
            proven.subject = subject
            _claims(proven.proof, meta, expected_claims(loaded, subject, block))
        elif made is not None and made.files and precision in NBITS:
            log(f"proof: quantizing the graph this run exported again, {precision.value}, to compare with …")
            proven = _prove_requantized(subject, made, onnx_dir, precision, block)
        else:
            proven = _prove_scoped(loaded, subject, onnx_dir, meta, precision, block)
            if proven is None:
                log(f"proof: exporting the reference again, {precision.value}, to compare with …")
                proven = _prove_exported(loaded, subject, onnx_dir, meta, block)
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e
    proven.proof.seconds = time.perf_counter() - t0
    return proven


def prove_checkpoint(src, onnx_dir: Path, meta: dict, precision: Precision) -> Proven:
    """The proof of a fused export against a checkpoint read tensor by tensor (``--stream``)."""
    try:
        t0 = time.perf_counter()
        proven = _prove_written(src, onnx_dir / "model.onnx", precision, recorded_block(meta))
        proven.proof.seconds = time.perf_counter() - t0
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e
    return proven


def _prove_written(src, path: Path, precision: Precision, block: int | None) -> Proven:
    """The fused graph of ``src`` written again in ``precision`` and compared as it is made."""
    proof = Proof("the fused graph written again from the reference weights, compared tensor by tensor")
    fp = FileProof(path.name)
    origins: Origins = {}
    with TensorFile(path) as actual:
        sink = CompareSink(actual, fp, origins)
        expected, _, _ = build_fused_graph(src, precision, sink, origins=origins, block=block)
        compare_graph(expected, actual.proto, fp)
        inline = {t.name: t for t in expected.graph.initializer}
        compare_initializers(expected, lambda n: tensor_array(inline[n]), actual, fp, origins, sink.done)
        if precision.is_quantized:  # which modules each quantized weight holds (a float one: by name)
            check_claims(expected, origins, fp)
    proof.files.append(fp)
    return Proven(proof, {path.name: origins})


def _prove_scoped(
    loaded: Loaded, subject: Subject, onnx_dir: Path, meta: dict, precision, block: int | None
) -> Proven | None:
    """A torch.onnx file proven without exporting the reference again (``verify.scoped``): its
    float graph rebuilt from its node and tensor names with the reference's weights, quantized
    again and compared. None (the proof then exports the reference) where the names do not map,
    or the file is not what they say: the export made again decides, and says what differs."""
    if (
        precision not in NBITS
        or subject.mode not in (ExportMode.MERGED, ExportMode.BASE)
        or "optimize" in meta
    ):
        return None
    specs = loaded.family.graph_specs(subject.model)
    if [f"{s.name}.onnx" for s in specs] != graph_files(meta) or not all(
        (onnx_dir / f"{s.name}.onnx").is_file() for s in specs
    ):
        return None
    proof = Proof(SCOPED)
    origins: dict[str, Origins] = {}
    for spec in specs:
        fp = FileProof(f"{spec.name}.onnx")
        proof.files.append(fp)
        with TensorFile(onnx_dir / fp.file) as got:
            io = [[v.name for v in got.proto.graph.input], [v.name for v in got.proto.graph.output]]
            made = scoped_float_graph(got.proto, spec.module, subject.model)
            if made is None or io != [list(spec.input_names), list(spec.output_names)]:
                return None
            want, origins[fp.file] = quantized_proto(made[0], precision, block=block), made[1]
            read = {t.name: t for t in want.graph.initializer}.__getitem__
            compare_graph(want, got.proto, fp)
            compare_initializers(want, lambda n, read=read: tensor_array(read(n)), got, fp, origins[fp.file])
            check_claims(want, origins[fp.file], fp)
        described = meta.get("graphs", {}).get(spec.name) if isinstance(meta.get("graphs"), dict) else None
        if (
            not fp.passed
            or not isinstance(described, dict)
            or io != [described.get("inputs"), described.get("outputs")]
        ):
            return None
    _claims(proof, meta, expected_claims(loaded, subject, block))
    return Proven(proof, origins, subject) if proof.passed else None


def _prove_exported(
    loaded: Loaded, subject: Subject, onnx_dir: Path, meta: dict, block: int | None
) -> Proven:
    """The reference exported into a scratch folder as ``meta`` says, compared file by file."""
    proof = Proof("the reference exported again as loraexport.json says, compared tensor by tensor")
    origins: dict[str, Origins] = {}
    index: list = []  # made at the first graph

    def on_float(path: Path) -> None:  # before quantizing: which module each float weight is
        if not index:
            index.append(weight_index(subject.model))
        origins[path.name] = float_origins(path, index[0])

    fused: Origins = {}
    scratch = Path(tempfile.mkdtemp(prefix="loraexport-proof-"))
    try:
        replay: dict = {}
        opset = meta.get("opset") if isinstance(meta.get("opset"), int) else None
        how = ExportSpec.of_graph(
            optimize="optimize" in meta, exporter=torch_exporter_of(meta), opset=opset, block_size=block
        )
        export_into(loaded, subject, scratch, replay, how, on_float=on_float, origins=fused)
        if fused:
            origins["model.onnx"] = fused
        quantized = subject.precision is not None and subject.precision.is_quantized
        for name in graph_files(replay):
            fp = FileProof(name)
            proof.files.append(fp)
            if not (onnx_dir / name).is_file():
                fp.fail("missing from the export")
                continue
            if not quantized and name not in origins:  # a float graph: a differing weight named by module
                on_float(scratch / name)
            with TensorFile(scratch / name) as want, TensorFile(onnx_dir / name) as got:
                compare_graph(want.proto, got.proto, fp)
                compare_initializers(want.proto, want.array, got, fp, origins.get(name, {}))
                if quantized:  # which modules each quantized weight holds, both ways
                    check_claims(want.proto, origins.get(name, {}), fp)
        _adapter_files(proof, scratch, replay, onnx_dir, meta)
        _claims(proof, meta, {k: replay[k] for k in CLAIMS if k in replay})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Proven(proof, origins, subject)


def _prove_requantized(
    subject: Subject, made: FloatGraphs, onnx_dir: Path, precision: Precision, block: int | None
) -> Proven:
    """Each float graph of ``made``, its weights matched to the reference's modules by value,
    quantized again in memory and compared with the file of the same name."""
    proof = Proof(
        "the graph this run exported, before quantizing, its float weights matched to the reference's "
        "modules by value, quantized again and compared tensor by tensor"
    )
    origins: dict[str, Origins] = {}
    index = weight_index(subject.model)
    for name in made.files:
        fp = FileProof(name)
        proof.files.append(fp)
        path = made.dir / name
        if not (onnx_dir / name).is_file():
            fp.fail("missing from the export")
            continue
        kept = lora_matmuls(path, subject.keep) if subject.keep else []
        model = onnx.load(str(path))
        origins[name] = float_origins(model, index)
        want = quantized_proto(model, precision, kept, block)
        read = {t.name: t for t in want.graph.initializer}.__getitem__
        with TensorFile(onnx_dir / name) as got:
            compare_graph(want, got.proto, fp)
            compare_initializers(want, lambda n, read=read: tensor_array(read(n)), got, fp, origins[name])
            check_claims(want, origins[name], fp)
    return Proven(proof, origins, subject)


def expected_claims(loaded: Loaded, subject: Subject, block: int | None = None) -> dict:
    """What ``loraexport.json`` must say of an export of ``subject`` that proof compares without
    exporting it again: the model's facts, the precision, the mode, the quantizer's settings."""
    from loraexport.stages.graphs import describe_quantization

    out = {
        "model": loaded.family.runtime_meta(subject.model) | {"family": loaded.family.name},
        "weights_dtype": (subject.precision or Precision.FLOAT32).value,
        "mode": subject.mode.value,
    }
    return out | describe_quantization(subject.precision, subject.mode, block)


def _claims(proof: Proof, meta: dict, expected: dict) -> None:
    for key, value in expected.items():
        said = meta.get(key)  # "base": a checkpoint `merge` wrote, exported alone, verified with its adapters
        if said != value and (key, said, value) != ("mode", "base", "merged"):
            proof.claims.append(
                f"loraexport.json: {key!r} is not what the export made from the reference says"
            )


def _adapter_files(proof: Proof, scratch: Path, replay: dict, onnx_dir: Path, meta: dict) -> None:
    """Each ``.onnx_adapter`` the export lists against the one the reference makes of the adapter
    it was made from (paired by the adapter's sha256); a listed file whose adapter was not given
    cannot be proven: it fails beside a quantized base, and is left to parity beside a float32 one
    (whose graph serves any adapter that fits it: verify may be given another)."""
    strict = Precision.parse(meta.get("weights_dtype", "float32")).is_quantized
    made = {e.get("source_sha256"): e for e in replay.get("adapter_files") or []}
    for entry in meta.get("adapter_files") or []:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.endswith(ADAPTER_SUFFIX) or os.sep in name:
            proof.claims.append(f"loraexport.json: adapter_files lists {str(name)[:80]!r}: no adapter file")
            continue
        twin = made.get(entry.get("source_sha256"))
        if twin is None and not strict:
            continue
        fp = FileProof(name)
        proof.files.append(fp)
        if twin is None:
            fp.fail("made from an adapter verify was not given (its source sha256 matches none): give every "
                    "adapter of the export to prove its files")  # fmt: skip
            continue
        _compare_adapter(scratch / twin["file"], onnx_dir / name, fp)


def _compare_adapter(want_path: Path, got_path: Path, fp: FileProof) -> None:
    try:
        got = Active(got_path).tensors
    except RuntimeInputError as e:
        fp.fail(str(e))
        return
    want = Active(want_path).tensors
    for name in sorted(set(got) - set(want)):
        fp.fail(f"tensor {name!r} is unclaimed: the adapter makes no such tensor")
    for name in sorted(set(want) - set(got)):
        fp.fail(f"tensor {name!r} is missing")
    for name in sorted(set(want) & set(got)):
        a, b = want[name].numpy(), got[name].numpy()
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            same = a.shape == b.shape and a.dtype == b.dtype
            diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if same else float("inf")
            fp.fail(f"tensor {name!r} differs from the adapter's (max difference {diff:.3g})")
        else:
            fp.tensors += 1
            fp.bytes += a.nbytes


# ---- the export computing in float32 ------------------------------------------------------------
def float_compute_dir(onnx_dir: Path, meta: dict, avoid: tuple[Path, ...] = ()) -> Path:
    """A scratch folder holding ``onnx_dir``'s graphs computing in float32, and its other files
    (weights, adapter files) hard-linked, not copied, where the file system allows; its user
    removes it."""
    scratch = Path(scratch_dir(onnx_dir, "float-compute", avoid))
    graphs = graph_files(meta)
    try:
        for name in graphs:
            proto = onnx.load(str(onnx_dir / name), load_external_data=False)
            onnx.save_model(float_compute_graph(proto)[0], str(scratch / name))
        for entry in os.scandir(onnx_dir):
            if entry.is_file(follow_symlinks=False) and entry.name not in graphs:
                link_or_copy(Path(entry.path), scratch / entry.name, copy=False)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def dequantized_reference(
    proven: Proven, onnx_dir: Path, meta: dict, model: nn.Module | None = None
) -> nn.Module:
    """``model`` (default: the proof's reference) with every quantized module's weight replaced by
    the float values the file's proven tensors stand for."""
    weights: dict = {}
    for name in graph_files(meta):
        for module, value in dequantized_weights(onnx_dir / name, proven.origins.get(name, {})).items():
            if module in weights and not torch.equal(weights[module], value):
                raise InvalidInputError(f"{module} is quantized differently in two graphs of {onnx_dir}")
            weights[module] = value
    target = model if model is not None else proven.subject.model
    if model is not None:  # adapter mode: the probe model's base layers are the base's modules
        weights = {k.removesuffix(".base_layer"): v for k, v in weights.items()}
    return dequantized_copy(target, weights)
