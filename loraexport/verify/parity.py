"""Numerical parity of the exported graphs against the *unmerged* PyTorch model.

Three computations of every output on the same inputs:
  * ``ref32`` — the unmerged model (base + LoRA branches) in float32: what the user trusts;
  * ``ref64`` — the same model in float64: the exact answer, up to float64 rounding;
  * ``onnx``  — the exported (merged) graphs in onnxruntime.

The tolerance is derived, not guessed. ``ref32``'s distance to ``ref64`` is the float32
noise this model has on these inputs; the export passes an output when its own distance to
``ref64`` is at most ``NOISE_MULTIPLE`` times that noise. Merging re-associates one sum per
weight (``W0·x + s·B·(A·x)`` becomes ``(W0 + s·B·A)·x``) and onnxruntime accumulates GEMMs in
another order; both move results by a few float32 roundings, the same order as torch's own
noise. A wrong weight or scaling moves them by orders of magnitude more (tests plant one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loraexport.artifact.schema import end_ids, graph_files
from loraexport.models.base import ModelFamily
from loraexport.runtime.model import OnnxModel, RuntimeInputError, chain_forward, vocab_size
from loraexport.verify.generation import (  # noqa: F401 (GenerationResult re-exported)
    GenerationResult,
    compare_generation,
    resolve_ties,
)
from loraexport.verify.task import task_targets

# ONNX's error vs float64 may be this many times torch-float32's own error vs float64.
# Different accumulation orders give errors of the same order (1-4x seen on these models);
# 10x leaves room for that while a planted error (1e-2 and up) is still far outside.
NOISE_MULTIPLE = 10.0
# loraexport's fused graph (--optimize for Llama/Mistral/Qwen2: onnxruntime's fused RMSNorm,
# rotary and attention kernels, each accumulating in its own order) may be this many times:
# on real SmolLM2-135M's base its cache reached 5.7-10.7x in layers 12-21 at 64 positions (the
# differences add up through the residual stream). A wrong weight is still 1e3x and more
# (``tests/export/test_optimize.py`` plants one).
FUSED_NOISE_MULTIPLE = 20.0
# A quantized export computing in float32 against the reference on its dequantized weights may be
# this many times its graph's float multiple: real SmolLM2-135M int8 (fused) reached 26.4x in one
# 2-token case, where torch's own error is smallest (no LoRA branch adds to it; other cases 1.3x,
# int4 --keep-adapter 4.6x, its float32 export 4.8x). A wrong weight is 1e3x and more.
QUANTIZED_FACTOR = 2.0
# torch-float32 almost exact on some output: the noise is at least this many ulps of its magnitude.
FLOOR_ULPS = 4
F32_EPS = float(np.finfo(np.float32).eps)
RANDOM_PROMPTS = 64  # generation prompts when no held-out data is given


@dataclass
class OutputParity:
    output: str
    max_abs_err: float  # onnx vs ref32
    max_rel_err: float  # max_abs_err / max |ref32|
    min_cosine: float  # per position, over the last axis
    onnx_err_vs_fp64: float | None  # None when the float64 run is not finite (see below)
    torch_err_vs_fp64: float | None
    tolerance: float  # allowed onnx_err_vs_fp64 (or max_abs_err when judged without float64)
    passed: bool
    top1_agreement: float | None = None  # logits only
    note: str | None = None
    stored_err_vs_fp64: float | None = None  # torch on the file's own rounded weights (verify.stored)


@dataclass
class ParityCaseResult:
    name: str
    batch: int
    seq: int
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class ParityResult:
    provider: str
    cases: list[ParityCaseResult]
    generation: GenerationResult | None
    reference: str = "unmerged PyTorch float32 (base + LoRA branches); float64 for the noise floor"
    noise_multiple: float = NOISE_MULTIPLE  # the tolerance's multiple of torch's own noise
    # a quantized export, judged computing in float32: the file as written against that
    # (``verify.dequantized.as_written``), what its int8 activations add, measured not judged
    as_written: dict | None = None

    @property
    def passed(self) -> bool:
        gen_ok = self.generation is None or self.generation.passed
        return all(c.passed for c in self.cases) and gen_ok

    def _all(self) -> list[OutputParity]:
        return [o for c in self.cases for o in c.outputs]

    @property
    def max_abs_err(self) -> float:
        return max(o.max_abs_err for o in self._all())

    @property
    def max_rel_err(self) -> float:
        return max(o.max_rel_err for o in self._all())

    @property
    def min_cosine(self) -> float:
        return min(o.min_cosine for o in self._all())

    @property
    def top1_agreement(self) -> float | None:
        vals = [o.top1_agreement for o in self._all() if o.top1_agreement is not None]
        return min(vals) if vals else None

    @property
    def failures(self) -> list[str]:
        out = [f"{c.name}/{o.output}: {_why(o)}" for c in self.cases for o in c.outputs if not o.passed]
        if self.generation and self.generation.first_mismatch:
            out.append(f"generation: {self.generation.first_mismatch}")
        return out


def _why(o: OutputParity) -> str:
    err = o.onnx_err_vs_fp64 if o.onnx_err_vs_fp64 is not None else o.max_abs_err
    text = f"onnx error {err:.3g} > tolerance {o.tolerance:.3g}"
    return text + ("" if o.top1_agreement in (None, 1.0) else f", top-1 agreement {o.top1_agreement:.1%}")


def torch_runner(family: ModelFamily, model: nn.Module):
    """``run(graph, feeds)`` over the torch modules that are exported, for ``chain_forward``."""
    specs = {s.name: s for s in family.graph_specs(model)}

    @torch.no_grad()
    def run(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = specs[graph]
        outs = spec.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names])
        return {n: o.numpy() for n, o in zip(spec.output_names, outs, strict=True)}

    return run


def seq_axis(name: str) -> int:
    """Where the sequence is in an output: (B, H, T, D) for caches, (B, T, ...) otherwise."""
    return 2 if ("present." in name or "key_values." in name) else 1


def compare_outputs(
    name: str,
    ref32: np.ndarray,
    ref64: np.ndarray,
    onnx: np.ndarray,
    valid: np.ndarray | None,
    multiple: float = NOISE_MULTIPLE,
    stored32: np.ndarray | None = None,
) -> OutputParity:
    """Errors of one output. ``valid`` (B, T) selects the unmasked positions (padding is not
    compared: runtimes may differ on fully masked rows); it applies when the output's batch and
    sequence axes (``seq_axis``) have its shape. ``stored32``: torch float32 on the weights the
    file stores (``verify.stored``); its error vs float64 counts as noise too."""
    stored32 = ref32 if stored32 is None or stored32.shape != ref32.shape else stored32
    if onnx.shape != ref32.shape:
        return OutputParity(name, float("inf"), float("inf"), -1.0, float("inf"), 0.0, 0.0, False)
    axis = seq_axis(name)
    if (
        valid is not None
        and ref32.ndim > axis
        and ref32.shape[0] == valid.shape[0]
        and ref32.shape[axis] == valid.shape[1]
    ):
        ref32, ref64, onnx, stored32 = (
            np.moveaxis(a, axis, 1)[valid] for a in (ref32, ref64, onnx, stored32)
        )
    ref32, ref64, onnx, stored32 = (a.astype(np.float64) for a in (ref32, ref64, onnx, stored32))
    abs_err = float(np.abs(onnx - ref32).max(initial=0.0))
    have64 = bool(np.isfinite(ref64).all())
    scale = float(np.abs(ref64 if have64 else ref32).max(initial=0.0))
    onnx64 = float(np.abs(onnx - ref64).max(initial=0.0)) if have64 else None
    torch64 = float(np.abs(ref32 - ref64).max(initial=0.0)) if have64 else None
    stored64 = float(np.abs(stored32 - ref64).max(initial=0.0)) if have64 else None
    tol = multiple * max(torch64 or 0.0, stored64 or 0.0, FLOOR_ULPS * F32_EPS * scale)
    flat_o, flat_r = onnx.reshape(-1, onnx.shape[-1]), ref32.reshape(-1, ref32.shape[-1])
    num = (flat_o * flat_r).sum(-1)
    den = np.linalg.norm(flat_o, axis=-1) * np.linalg.norm(flat_r, axis=-1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
    top1 = None
    if name.endswith("logits"):
        top1 = float((flat_o.argmax(-1) == flat_r.argmax(-1)).mean()) if len(flat_o) else 1.0
    finite = bool(np.isfinite(onnx).all())
    err = onnx64 if have64 else abs_err
    passed = finite and err <= tol and (top1 is None or top1 == 1.0)
    return OutputParity(
        name,
        abs_err,
        abs_err / max(scale, 1e-30),
        float(cos.min(initial=1.0)),
        onnx64,
        torch64,
        tol,
        passed,
        top1,
        stored_err_vs_fp64=stored64 if stored64 != torch64 else None,
    )


def check_same_model(expected: dict, opened: OnnxModel) -> None:
    """The export is of this model's kind, cache shape (layers, key/value heads, head size) and
    vocabulary; else it is an export of another model (``RuntimeInputError``: exit 3, before any run)."""
    check_model_facts(expected, opened.kind, tuple(opened.cache_shape), opened.vocab_size, opened.dir)


def check_described_model(expected: dict, onnx_dir: Path, meta: dict) -> None:
    """``check_same_model`` before any session is opened (before the proof, which would say only
    that the files are not this reference's): the kind and vocabulary ``loraexport.json`` gives,
    the cache shape the decoder graph's inputs declare (``past_key_values.{i}.key``: (B, heads, T, D))."""
    from loraexport.verify.tensorfile import TensorFile

    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    graph = onnx_dir / graph_files(meta)[-1]  # the decoder's (the one with the cache)
    with TensorFile(graph) as f:
        past = [i for i in f.proto.graph.input if i.name.startswith("past_key_values.")]
    dims = [d.dim_value or None for d in past[0].type.tensor_type.shape.dim] if past else []
    shape = (len(past) // 2, dims[1], dims[3]) if len(dims) == 4 else (0, 0, 0)
    check_model_facts(expected, model.get("kind"), shape, vocab_size(model), onnx_dir)


def check_model_facts(expected: dict, kind, shape: tuple, vocab: int | None, where: Path) -> None:
    want = (expected.get("n_layers"), expected.get("kv_heads"), expected.get("head_dim"))
    if kind != expected["kind"] or (kind != "encoder" and tuple(shape) != want):
        raise RuntimeInputError(
            f"{where} is an export of another model: a {_described(kind, shape)}, "
            f"but the base is a {_described(expected['kind'], want)}"
        )
    base = vocab_size(expected)
    if vocab is not None and base is not None and vocab != base:
        raise RuntimeInputError(
            f"{where} is an export of another model: a vocabulary of {vocab}, the base's {base}"
        )


def _described(kind: str, shape: tuple) -> str:
    return kind if kind == "encoder" else f"{kind} model with cache (layers, heads, head size) {tuple(shape)}"


def noise_multiple(fused: bool, quantized: bool) -> float:
    """The tolerance's multiple of torch's own noise for a graph (``fused``: loraexport's fused one;
    ``quantized``: computing in float32 on its dequantized weights)."""
    return (FUSED_NOISE_MULTIPLE if fused else NOISE_MULTIPLE) * (QUANTIZED_FACTOR if quantized else 1.0)


def check_parity(
    family: ModelFamily,
    unmerged: nn.Module,
    onnx_model: OnnxModel | Callable[[], OnnxModel],
    *,
    samples: int = 6,
    seed: int = 0,
    sources: list[str] | None = None,
    generation_rows: int | None = None,
    tokenizer: Any | None = None,
    targets: list[str] | None = None,
    stored: nn.Module | None = None,
    quantized: bool = False,
) -> ParityResult:
    """Compare every output of ``onnx_model`` with ``unmerged`` on ``samples`` cases, then greedy decoding.

    ``onnx_model`` may be a function opening the session: it is then closed before the torch
    runs, so the onnxruntime copy of the weights and the float64 model are never held together.
    ``tokenizer``: the base's (``ModelFamily.tokenizer``), which turns ``sources`` into
    generation prompts; without one, a family makes prompts of its own. ``targets`` (one per
    source, with a tokenizer): the generated text is also scored against them (exact match).
    ``stored``: the model with the weights a merged float32 file holds (checked by the caller with
    ``verify.stored``): its own float32 error counts as noise too. ``quantized``: a quantized
    export computing in float32 against ``unmerged`` on its dequantized weights (``QUANTIZED_FACTOR``).
    """
    opened = onnx_model if isinstance(onnx_model, OnnxModel) else onnx_model()
    kind, shape, provider = opened.kind, opened.cache_shape, opened.provider
    multiple = noise_multiple(opened.kv_cache == "shared-buffer", quantized)
    check_same_model(family.runtime_meta(unmerged), opened)
    cases = family.parity_cases(unmerged, samples, seed)
    args = [
        (
            c.inputs["input_ids"].numpy(),
            c.inputs["attention_mask"].numpy(),
            c.inputs["decoder_input_ids"].numpy() if "decoder_input_ids" in c.inputs else None,
        )
        for c in cases
    ]
    ox = [opened.forward_all(*a) for a in args]
    prompts, got_tokens, eos = [], [], None
    if kind != "encoder":
        eos = end_ids(opened.meta["model"])  # every end id
        # every given source (held-out data), else ``rows`` (default 64) random prompts
        chosen = sources[:generation_rows] if sources and generation_rows else sources
        prompts = list(family.prompts(unmerged, tokenizer, chosen, generation_rows or RANDOM_PROMPTS, seed))
        got_tokens = [
            opened.generate(p["input_ids"].numpy(), p["attention_mask"].numpy(), n) for p, n in prompts
        ]
    del opened  # when we opened it, this frees the session (and its copy of the weights)
    run = torch_runner(family, unmerged)
    r32 = [chain_forward(run, kind, shape, *a, dtype=np.float32) for a in args]
    if stored is not None:
        run_stored = torch_runner(family, stored)
        s32 = [chain_forward(run_stored, kind, shape, *a, dtype=np.float32) for a in args]
    else:
        s32 = [{} for _ in args]
    task = task_targets(family, unmerged, tokenizer, sources, targets) if prompts else {}
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if task else None
    generation = (
        compare_generation(family, unmerged, prompts, got_tokens, eos, task, decode) if prompts else None
    )
    # The float64 run converts the model in place and back (float32 → float64 → float32 is
    # exact), so no second copy of the weights is held.
    unmerged.double()
    try:
        r64 = [chain_forward(run, kind, shape, *a, dtype=np.float64) for a in args]
        if kind == "causal":
            for a, o64 in zip(args, r64, strict=True):
                _unpadded_rows(run, shape, a, o64)
    finally:
        unmerged.float()
    results = []
    for case, o32, o64, onx, st in zip(cases, r32, r64, ox, s32, strict=True):
        B, T = case.valid.shape
        res = ParityCaseResult(case.name, B, T)
        valid = case.valid.numpy()
        for out_name in o32:
            res.outputs.append(
                compare_outputs(
                    out_name, o32[out_name], o64[out_name], onx[out_name], valid, multiple, st.get(out_name)
                )
            )
        results.append(res)
    _judge_without_float64(results)
    if generation is not None and generation.parted and kind == "causal":
        allowed = [o.tolerance for r in results for o in r.outputs if "logits" in o.output]
        tolerance = max(allowed, default=0.0)
        unmerged.double()
        try:
            resolve_ties(generation, lambda ids: _next_logits(run, shape, ids), tolerance)
        finally:
            unmerged.float()
    return ParityResult(provider, results, generation, noise_multiple=multiple)


def _next_logits(run, shape, ids: np.ndarray) -> np.ndarray:
    """The reference's float64 logits of the token after ``ids`` (T,), one unpadded row."""
    out = chain_forward(run, "causal", shape, ids[None], np.ones((1, ids.size), np.int64), dtype=np.float64)
    return out["model.logits"][0, -1]


def _unpadded_rows(run, shape, args, out64: dict[str, np.ndarray]) -> None:
    """A padded decoder case's float64 outputs, recomputed row by row on each row's unmasked
    tokens alone (positions count unmasked tokens, so the values at those positions are the
    same computation) where the padded run is not finite, in place.

    transformers' eager attention turns a fully masked row (a left-padded position) into NaN in
    float64, and ``0 × NaN`` in ``probs @ V`` carries it to the row's real positions; without
    this, such a case was judged against float32 with the noise of other cases, which on real
    SmolLM2-135M's base was 4 to 7 times too tight for the cache of a left-padded batch."""
    ids, mask, _ = args
    for i in range(ids.shape[0]):
        keep = mask[i].astype(bool)
        if keep.all() or not keep.any() or all(np.isfinite(v[i]).all() for v in out64.values()):
            continue
        one = np.ones((1, int(keep.sum())), np.int64)
        row = chain_forward(run, "causal", shape, ids[i : i + 1, keep], one, dtype=np.float64)
        for name, value in row.items():
            if name in out64 and out64[name].ndim == value.ndim:
                axis = seq_axis(name)
                np.moveaxis(out64[name], axis, 1)[i, keep] = np.moveaxis(value, axis, 1)[0]


def _judge_without_float64(results: list[ParityCaseResult]) -> None:
    """Outputs whose float64 run is not finite are judged against float32 with the noise seen on
    the same output in the other cases.

    transformers' eager attention turns a fully masked row (a left-padded position) into NaN in
    float64, and the NaN reaches real positions through ``0 × NaN`` in ``probs @ V``; float32
    stays finite. The float32 reference is still valid there, its noise level is not.
    """
    noise: dict[str, float] = {}
    for c in results:
        for o in c.outputs:
            if o.torch_err_vs_fp64 is not None:
                noise[o.output] = max(noise.get(o.output, 0.0), o.tolerance)
    for c in results:
        for o in c.outputs:
            if o.torch_err_vs_fp64 is None:
                o.tolerance = max(o.tolerance, noise.get(o.output, 0.0))
                o.passed = o.passed or (o.max_abs_err <= o.tolerance and o.top1_agreement in (None, 1.0))
                o.note = "float64 run not finite (masked rows); judged vs float32 with other cases' noise"
