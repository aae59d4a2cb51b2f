"""The layer-streamed reference's side of a verification, in bounded memory: the few short inputs
it runs (``ROWS`` rows of ``LENGTH`` tokens, one left-padded, and ``NEW_TOKENS`` greedy tokens:
each reference pass reads the whole checkpoint, so a 7B model costs one read of 13.5 GB per pass,
and generation one pass per token), onnxruntime's outputs on them (one session, or a few layers
at a time for the fused graph: ``verify.chunked``), the reference decoder of a checkpoint and its
adapters (``verify.streamed``), and the figures made of their outputs. ``stages.references``
sequences them."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import torch

from loraexport.core.enums import ExportMode, Precision
from loraexport.core.progress import Progress
from loraexport.core.threads import cores
from loraexport.errors import InvalidInputError, first_line
from loraexport.export.streamed import CheckpointSource
from loraexport.runtime.model import OnnxModel, RuntimeInputError
from loraexport.runtime.sessions import ORT_ERRORS
from loraexport.training.data import read_pairs
from loraexport.verify.chunked import ChunkedDecoder, is_fused
from loraexport.verify.options import VerifyOptions
from loraexport.verify.parity import GenerationResult, ParityCaseResult
from loraexport.verify.quantized import REFERENCE_TEXTS, QuantCost, adapter_figures, effect_sums

ROWS = 2
LENGTH = 24
LEFT_PAD = 5  # the second row's leading pads: left-padded batches are what generation feeds
NEW_TOKENS = 8
REFERENCE = (
    "the unmerged model (base + LoRA branches) computed layer by layer from the safetensors "
    "(verify.streamed), float32; float64 for the noise floor"
)


def streamed_inputs(
    src: CheckpointSource, seed: int, sources: list[str] | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """``ROWS`` rows of up to ``LENGTH`` tokens (text when the base has a tokenizer: the
    ``--eval-data`` prompts, else ``REFERENCE_TEXTS``), the last row left-padded; (ids, mask,
    what they are)."""
    from loraexport.models.hf.tokenizer import encode, load_tokenizer

    vocab, positions = int(src.decoder.vocab), int(src.decoder.max_positions)
    if positions < 2 * NEW_TOKENS:
        raise InvalidInputError(
            f"max_position_embeddings {positions}: a streamed verification needs {2 * NEW_TOKENS} positions"
        )
    length = min(LENGTH, positions - NEW_TOKENS)
    tokenizer = load_tokenizer(src.checkpoint.dir, vocab)
    rows: list[list[int]]
    texts = [t for t in (sources or []) if t.strip()][:ROWS]
    if tokenizer is not None and len(texts) < ROWS:
        texts += list(REFERENCE_TEXTS[: ROWS - len(texts)])
    if tokenizer is not None:
        rows = [s[:length] or [0] for s in encode(tokenizer, texts, vocab)]
        what = "the --eval-data prompts' first tokens" if sources else "the reference texts' first tokens"
    else:
        g = torch.Generator().manual_seed(seed)
        rows = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(ROWS)]
        what = "random token ids"
    rows[-1] = rows[-1][: max(1, min(len(rows[-1]), length - LEFT_PAD))]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask, what


def inputs_of(src: CheckpointSource) -> tuple[Path, ...]:
    """The folders verification reads (no scratch folder is made inside them)."""
    return (src.checkpoint.dir, *(Path(a.path) for a in src.adapters if a.path is not None))


def branches(src: CheckpointSource) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """The adapters' LoRA branches by module, with their coefficients (weight × scaling)."""
    out: dict[str, list] = {}
    for a, w in zip(src.adapters, src.weights, strict=True):
        for path, (lora_a, lora_b) in a.weights.items():
            out.setdefault(path, []).append((lora_a, lora_b, float(w * a.config.scaling(path))))
    return out


def onnx_outputs(
    directory: Path,
    meta: dict,
    threads: int,
    ids: np.ndarray,
    mask: np.ndarray,
    generate: bool,
    progress: bool,
    avoid: tuple[Path, ...] = (),
):
    """onnxruntime's logits at every position (teacher forcing) and, with ``generate``, its greedy
    tokens. A fused graph runs a few layers at a time (``verify.chunked``): onnxruntime never holds
    the whole model; any other causal export in one session."""
    try:
        if is_fused(meta):
            with ChunkedDecoder(directory, meta, threads, progress=progress, avoid=avoid) as model:
                logits = model.forward_all(ids, mask)
                tokens = model.generate(ids, mask, NEW_TOKENS) if generate else None
        else:
            model = OnnxModel(directory, "cpu", threads, meta, spinning=False)
            logits = model.forward_all(ids, mask)["model.logits"]
            tokens = model.generate(ids, mask, NEW_TOKENS) if generate else None
            del model
    except RuntimeInputError as e:
        raise InvalidInputError(str(e)) from e
    except ORT_ERRORS as e:  # a graph that does not run on these inputs: not this model's export
        raise InvalidInputError(f"onnxruntime cannot run {directory}: {first_line(e)}") from e
    gc.collect()
    return logits.astype(np.float64), tokens


def without_adapter(onnx_dir: Path, scratch: Path) -> None:
    """``scratch/model.onnx``: the graph of ``onnx_dir`` with its LoRA coefficients
    (``<name>.lora_c.<j>``) zero, reading the same ``model.onnx.data`` (hard-linked: no copy).
    Not a session-level override: onnxruntime folds a scalar Mul into the MatMul before overrides
    apply (measured: an override of the coefficients changed nothing)."""

    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        if ".lora_c." in t.name:
            t.CopyFrom(numpy_helper.from_array(np.zeros((), np.float32), t.name))
    onnx.save_model(proto, str(scratch / "model.onnx"))
    data = onnx_dir / "model.onnx.data"
    try:
        (scratch / data.name).hardlink_to(data)
    except OSError:  # another file system: a copy (the export's size, once)
        shutil.copyfile(data, scratch / data.name)


def setup_threads(opts: VerifyOptions) -> int:
    threads = opts.threads or cores()
    torch.set_num_threads(threads)
    return threads


def eval_sources(opts: VerifyOptions) -> list[str] | None:
    return [p for p, _ in read_pairs(opts.eval_data)] if opts.eval_data else None


def case_result(what: str, ids: np.ndarray, parity) -> ParityCaseResult:
    return ParityCaseResult(
        f"{what}, {ids.shape[0]}×{ids.shape[1]} (one row left-padded)", *ids.shape, [parity]
    )


def reference_decoder(cls, src: CheckpointSource, bar, weights=None, kept: bool = True):
    """The layer-streamed reference of ``src``: its LoRA branches and its adapters' replacements;
    ``weights``: a proven export's dequantized weights, holding the merge unless ``kept``."""
    try:
        magnitudes = {p: m for a in src.adapters for p, m in a.magnitudes.items()}  # DoRA: one adapter
        if not kept:  # a merged export's weights hold the adapter, DoRA's magnitude included
            return cls(src.checkpoint.dir, {}, progress=bar, overrides=src.replacements, weights=weights)
        kw = {"overrides": src.replacements, "magnitudes": magnitudes, "weights": weights}
        return cls(src.checkpoint.dir, branches(src), progress=bar, **kw)
    except ValueError as e:  # what the reference cannot compute, in one line
        raise InvalidInputError(str(e).splitlines()[0]) from e


class ReferenceBar:
    """A bytes progress bar for the reference's passes over the checkpoint (each pass restarts it)."""

    def __init__(self, src: CheckpointSource, progress: bool, what: str) -> None:
        self.bar = Progress(src.checkpoint.nbytes, what, "B", progress)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total, self.bar.n = total, 0 if done < self.bar.n else self.bar.n
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def generation_result(got: np.ndarray, want: np.ndarray) -> GenerationResult:
    same = (got == want).all(axis=1)
    first = None
    if not same.all():
        row = int(np.flatnonzero(~same)[0])
        col = int(np.flatnonzero(got[row] != want[row])[0])
        first = f"row {row}, token {col}: onnx {int(got[row, col])} vs reference {int(want[row, col])}"
    return GenerationResult(len(same), int(same.sum()), got.shape[1], first)


def streamed_quality_cost(
    q, q0, out, streams, valid, generation, precision: Precision, kind: ExportMode, what: str
) -> QuantCost:
    """What the quantized export ``q`` keeps of the layer-streamed unmerged float32 model (``out``'s
    first stream) and of the adapter (against ``q0``, the export without it, and the base, the
    second stream): ``verify.quantized``'s figures, on the positions ``valid``."""
    u = out[streams[0]].double().numpy()
    b = out[streams[1]].double().numpy()
    diff = (q - u)[valid]
    adapter = "kept in float32" if kind is ExportMode.UNMERGED else "merged"
    retained = effect_error = None
    effect = 0.0
    if q0 is not None:
        sums = effect_sums((q - q0)[valid], (u - b)[valid])
        retained, effect_error = adapter_figures(sums)
        effect = float(np.sqrt(sums[1] / diff.size)) if diff.size else 0.0
    return QuantCost(
        precision.value,
        adapter,
        float(np.abs(diff).max(initial=0.0)),
        float(np.sqrt((diff**2).mean())) if diff.size else 0.0,
        float((q.argmax(-1) == u.argmax(-1))[valid].mean()),
        generation.agreement,
        effect,
        retained,
        effect_error,
        inputs=f"{what} (against the layer-streamed unmerged reference)",
        positions=int(valid.sum()),
    )
