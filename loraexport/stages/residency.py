"""Where an export's weights are while it is made: the model built in torch, or the checkpoint read
tensor by tensor (``stages.sources``). ``streams`` decides, once, for ``export``,
``merge-and-export`` and ``verify``: ``--stream``, ``--no-stream``, or by default the bounded path for
the decoders the fused writer supports whenever it does what is asked; ``check_streamable`` refuses,
in one line and before any work, what the streamed path does not do."""

from __future__ import annotations

import math
from pathlib import Path

from loraexport.core.enums import ExportMode, Precision
from loraexport.core.io import read_json
from loraexport.core.memory import available, peak_rss
from loraexport.errors import ExportError, InvalidInputError, ModelFormatError
from loraexport.export.quantize import NBITS_BLOCK
from loraexport.export.streamed import Checkpoint, float32_bytes
from loraexport.models.hf.decoder_config import check_fused_dir, read_config
from loraexport.models.types import FUSED_TYPES
from loraexport.spec import ExportSpec
from loraexport.verify.options import VerifyOptions

# The in-memory path's peak as a multiple of the float32 weights (make bench-large: export 2.39x,
# merge-and-export 2.59x, with --dtype 3.42x): auto-streaming starts where that would not fit.
IN_MEMORY_FACTOR = 2.6


def wants_stream(model_dir: str | Path, stream: bool | None) -> bool:
    """``--stream`` (True), ``--no-stream`` (False) or auto (None): stream a Llama/Mistral/Qwen2
    checkpoint when the in-memory path would need more than the memory available now."""
    if stream is False:
        return False
    config = read_json(Path(model_dir) / "config.json", ModelFormatError)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if stream:
        if kind not in FUSED_TYPES:
            raise InvalidInputError(
                f"--stream writes {', '.join(FUSED_TYPES)} decoders; {model_dir} is of type {kind!r}"
            )
        return True
    if kind not in FUSED_TYPES:
        return False
    free = available()
    try:
        need = float32_bytes(model_dir) * IN_MEMORY_FACTOR
    except ModelFormatError:  # the in-memory path reports a broken checkpoint, in its own order
        return False
    return free is not None and need > free


def streams(model_dir: str | Path, spec: ExportSpec, verify: VerifyOptions | None, adapters=()) -> bool:
    """Whether an export of ``model_dir`` (verified with ``verify``, or not verified: None) is
    written from the checkpoint: ``--stream``, ``--no-stream``, or by default for the decoders the
    fused writer supports, whenever the streamed path does what is asked — the bounded path is the
    default, whatever the size. Otherwise only when the in-memory path would not fit (the streamed
    path's checks then say, in one line, what it cannot do)."""
    if spec.stream is not None:
        return wants_stream(model_dir, spec.stream)
    config = read_json(Path(model_dir) / "config.json", ModelFormatError)
    if not isinstance(config, dict) or config.get("model_type") not in FUSED_TYPES:
        return False
    return streamable(model_dir, spec, verify, adapters) or wants_stream(model_dir, None)


def streamable(model_dir: str | Path, spec: ExportSpec, verify: VerifyOptions | None, adapters=()) -> bool:
    """The streamed path does what ``spec`` (and ``verify``) ask of this model: not adapter mode,
    int8-dynamic, a torch.onnx option (--exporter, --opset), a verified half-precision export,
    another provider than the CPU, a DoRA adapter kept unmerged, or a configuration the fused
    graph cannot compute."""
    from loraexport.spec import DEFAULT_OPSET

    if spec.mode is ExportMode.ADAPTER or spec.precision is Precision.INT8_DYNAMIC:
        return False
    if spec.exporter is not None or spec.opset != DEFAULT_OPSET:
        return False
    if verify is not None and (spec.half or any(p != "cpu" for p in verify.providers or [])):
        return False
    if spec.mode is ExportMode.UNMERGED and any(_is_dora(a) for a in adapters):
        return False
    try:
        check_fused_dir(model_dir)
    except (ExportError, ModelFormatError, OSError, ValueError):
        return False
    return True


def _is_dora(path) -> bool:
    from loraexport.lora.adapter import CONFIG_NAME
    from loraexport.lora.config import LoraConfig

    try:
        cfg = read_json(Path(path) / CONFIG_NAME, ModelFormatError)
        return isinstance(cfg, dict) and LoraConfig.from_dict(cfg).use_dora
    except Exception:  # an unreadable adapter is reported by the path that loads it
        return False


def check_streamable(
    model_dir,
    mode: ExportMode,
    half: Precision | None,
    verify: bool,
    opts=None,
    command: str = "merge-and-export",
) -> None:
    """What the streamed path does not do, refused before any work (``InvalidInputError``): the
    adapter mode, verifying a half-stored export, another provider than the CPU, and a model
    configuration the fused graph cannot compute (read from config.json alone)."""
    if mode is ExportMode.ADAPTER:
        raise InvalidInputError(
            "--mode adapter is not streamed: give --no-stream (the model must fit in memory)"
        )
    if half and verify:
        how = (
            "--no-verify, or --quantize"
            if command != "verify"
            else "--no-stream on a machine that holds the model"
        )
        raise InvalidInputError(
            f"a streamed {half.value} export is not verified yet: give {how} "
            "(a quantized one is verified against the layer-streamed reference)"
        )
    providers = [p for p in (getattr(opts, "providers", None) or []) if p != "cpu"]
    if verify and providers:
        raise InvalidInputError(
            f"a streamed verification runs on the CPU; --provider {providers[0]} is not streamed"
        )
    read_config(Path(model_dir))  # a fused family, before transformers reads it
    try:
        check_fused_dir(model_dir)  # as the writer reads it
    except ExportError as e:
        raise InvalidInputError(f"--stream: {Path(model_dir) / 'config.json'}: {e}") from e


# A streamed export of a model this small is verified with the model in memory: the fuller checks
# (parity cases of several shapes, generation, --eval-data's task, latency) cost at most ~3.6 GB
# (IN_MEMORY_FACTOR and the proof's copy, make bench-bounded), while larger ones stay bounded.
VERIFY_IN_MEMORY_BYTES = 1_000_000_000  # float32 weights: 250 M parameters


def verifies_in_memory(model_dir: str | Path) -> bool:
    """A streamed export of ``model_dir`` is verified in memory: small, and fits now."""
    try:
        need = float32_bytes(model_dir)
    except ModelFormatError:  # the streamed path reports a broken checkpoint
        return False
    free = available()
    return need <= VERIFY_IN_MEMORY_BYTES and (free is None or need * IN_MEMORY_FACTOR < free)


SESSION_MARGIN = 1.25  # onnxruntime's session beyond its weights: arena, activations, the cache


def session_bytes(checkpoint: Checkpoint, precision: Precision) -> int:
    """What onnxruntime holds to run the export, about: float32 weights for a float32 or
    half-stored export (it folds the Casts when it loads), else the quantized MatMuls (at most 8
    bits and a float32 scale per block of 16) and a float32 embedding."""
    if not precision.is_quantized:
        return 4 * checkpoint.numel
    embed = math.prod(checkpoint.shape("model.embed_tokens.weight"))
    return int((checkpoint.numel - embed) * (1 + 4 / min(NBITS_BLOCK.values()))) + 4 * embed


def check_session_fits(checkpoint: Checkpoint, precision: Precision) -> None:
    """Refuse (``InvalidInputError``, before any work) to verify an export onnxruntime could not
    hold in the memory available now, and say what it would need: an export that is not the fused
    graph runs in one session (the fused graph runs a few layers at a time, ``verify.chunked``)."""
    need, free = int(session_bytes(checkpoint, precision) * SESSION_MARGIN), available()
    if free is not None and need > free:
        how = (
            "float32 compute of its weights"
            if not precision.is_quantized
            else f"its {precision.value} weights"
        )
        raise InvalidInputError(
            f"verifying this export needs about {need / 1e9:.1f} GB for onnxruntime to run it ({how}); "
            f"{free / 1e9:.1f} GB is available: give --no-verify, --quantize int8/int4, or run on a machine "
            "with more memory"
        )


def memory_facts(checkpoint: Checkpoint) -> dict:
    """The run's peak resident memory beside the weights' bytes, for the report."""
    peak = peak_rss()
    return {
        "weights_bytes": checkpoint.nbytes,
        "float32_weights_bytes": 4 * checkpoint.numel,
        "peak_rss_bytes": peak,
        "weights_gb": round(checkpoint.nbytes / 1e9, 3),
        "float32_weights_gb": round(4 * checkpoint.numel / 1e9, 3),
        "peak_rss_gb": round(peak / 1e9, 3),
    }
