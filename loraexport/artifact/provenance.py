"""The one writer of ``loraexport.json``: what an output is, what made it from what, and the
sha256 of every file it holds — written once, when the output is complete.

Stages describe their output as they work (``export_description``, ``inputs``); the
description travels to ``output.write_output``, which calls ``write`` on the finished
temporary folder just before it is moved into place. Readers: ``schema.read_export_meta``
(bounded, type-checked) and ``manifest.check_manifest``.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from loraexport.artifact.manifest import MANIFEST, SELF_DIGEST, description_digest, files_in, sha256


def versions() -> dict[str, str]:
    """The versions that made an output (loraexport, torch, onnx, onnxruntime, Python)."""
    import onnx
    import onnxruntime
    import torch

    from loraexport._version import __version__

    return {
        "loraexport": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def export_description(
    model: dict, result, weights_dtype: str, mode: str, streamed: bool = False
) -> dict[str, Any]:
    """What an export holds: the model's runtime facts (``model``: a model family's
    ``runtime_meta``, or a checkpoint's config read by the streamed writer), how it was exported,
    its graphs' I/O; ``streamed``: written from the checkpoint tensor by tensor."""
    out = {
        "model": model,
        "opset": result.opset,  # as written (read back from the file)
        "exporter": result.exporter,
        "weights_dtype": weights_dtype,
        "graphs": {
            g: {"inputs": result.inputs[g], "outputs": result.outputs[g], **result.layouts.get(g, {})}
            for g in result.inputs
        },
        "mode": mode,
    }
    if result.optimized:
        out["optimize"] = result.optimized
    if streamed:
        out["streamed"] = True
    return out


def path_entry(path: str | Path, digest: str) -> dict[str, str]:
    return {"path": str(path), "sha256": digest}


def write(directory: Path, meta: dict[str, Any] | None = None, known: dict[Path, str] | None = None) -> dict:
    """Write ``directory/loraexport.json`` once: ``meta`` (an export's description and inputs,
    with the versions that made it), ``"files"``, the sha256 of every file in ``directory``, and
    ``"sha256"``, the digest of everything else it says (``manifest.description_digest``).

    ``known`` holds digests already computed (by a ``manifest.Hasher``) for files that have
    not changed since.
    """
    out = dict(meta or {})
    if meta is not None:  # a description (even one still empty) records what made it
        out.setdefault("versions", versions())
    known = {Path(k).resolve(): v for k, v in (known or {}).items()}
    out["files"] = {
        p.relative_to(directory).as_posix(): known.get(p.resolve()) or sha256(p) for p in files_in(directory)
    }
    out[SELF_DIGEST] = description_digest(out)
    (directory / MANIFEST).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out
