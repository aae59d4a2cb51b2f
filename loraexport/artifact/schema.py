"""``loraexport.json`` read back: bounded (``untrusted``) and checked key by key, so a reader
(``runtime.OnnxModel``, ``verify``, ``inspect``) never trusts its types. ``provenance`` writes it.

No torch here: ``loraexport.runtime`` uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraexport.core.enums import ExportMode, Precision
from loraexport.core.untrusted import read_json, short_repr

KINDS = ("seq2seq", "causal", "encoder")
EXPORTERS = ("dynamo", "torchscript")  # the torch.onnx exporters (loraexport.export.onnx)
BUILDER = "loraexport"  # a graph written by loraexport itself (--optimize: export.fused)
LOGITS = ("all", "last")  # positions whose logits a graph computes
KV_CACHES = ("growing", "shared-buffer")  # present = past + new, or one buffer updated in place
META = "loraexport.json"

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer"}
_JSON_TYPES.update({float: "a number", type(None): "null"})


def _describe(value: object) -> str:
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {short_repr(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _choice(*values: str):
    return lambda v: v in values, f"one of {', '.join(values)}"


# Optional top-level keys of an export description: (is it valid, what it must be).
_TOP_LEVEL = {
    "opset": (_is_int, "an integer"),
    "exporter": _choice(*EXPORTERS, BUILDER),
    "optimize": (lambda v: isinstance(v, dict), "an object"),
    "weights_dtype": _choice(*Precision.choices("all")),
    "mode": _choice(*(m.value for m in ExportMode)),
    "inputs": (lambda v: isinstance(v, dict), "an object"),
    "versions": (lambda v: isinstance(v, dict), "an object"),
    "files": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "an object of sha256 digests",
    ),
    "sha256": (lambda v: isinstance(v, str), "a string (the description's own digest)"),
}


def check_export_meta(meta: object, where: str | Path, error: type[Exception]) -> dict:
    """``meta`` (a parsed ``loraexport.json``) if it is an export description whose every key
    that loraexport reads has the right type; else ``error`` naming ``where`` and the key.

    Checked: ``model`` (an object: ``kind`` one of ``KINDS``; ``family`` a string;
    ``special_tokens`` an object of integers or null, required), ``graphs`` (an object of
    ``{"inputs": [...], "outputs": [...], "logits": LOGITS, "kv_cache": KV_CACHES}``), and the
    optional keys of ``_TOP_LEVEL``.
    """

    def bad(key: str, want: str, value: object) -> Exception:
        return error(f"{where}: {key!r} must be {want}, not {_describe(value)}")

    if not isinstance(meta, dict):
        raise error(f"{where}: not a loraexport export description (a JSON object), but {_describe(meta)}")
    if "model" not in meta:
        raise error(f"{where}: not a loraexport export description (no 'model' key)")
    model = meta["model"]
    if not isinstance(model, dict):
        raise bad("model", "an object", model)
    kind = model.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise bad("model.kind", f"one of {', '.join(KINDS)}", kind)
    if "family" in model and not isinstance(model["family"], str):
        raise bad("model.family", "a string", model["family"])
    tokens = model.get("special_tokens")  # every family writes them (pad, eos ...)
    if not isinstance(tokens, dict):
        raise bad("model.special_tokens", "an object", tokens)
    for name, token in tokens.items():
        if token is not None and not _is_int(token):
            raise bad(f"model.special_tokens.{name}", "an integer or null", token)
    ends = model.get("eos_token_ids")  # every end token; special_tokens.eos is the first
    if ends is not None and not (isinstance(ends, list) and all(_is_int(t) for t in ends)):
        raise bad("model.eos_token_ids", "an array of integers", ends)
    graphs = meta.get("graphs", {})
    if not isinstance(graphs, dict):
        raise bad("graphs", "an object", graphs)
    for name, graph in graphs.items():
        if not isinstance(graph, dict):
            raise bad(f"graphs.{name}", "an object", graph)
        for key in ("inputs", "outputs"):
            if key in graph and not _str_list(graph[key]):
                raise bad(f"graphs.{name}.{key}", "an array of names", graph[key])
        for key, values in (("logits", LOGITS), ("kv_cache", KV_CACHES)):
            if key in graph and graph[key] not in values:
                raise bad(f"graphs.{name}.{key}", f"one of {', '.join(values)}", graph[key])
    for key, (valid, want) in _TOP_LEVEL.items():
        if key in meta and not valid(meta[key]):
            raise bad(key, want, meta[key])
    return meta


def read_export_meta(directory: str | Path, error: type[Exception]) -> dict:
    """``directory/loraexport.json``, read bounded (``untrusted.MAX_JSON_BYTES``) and checked
    (``check_export_meta``); a missing, oversized, malformed or mistyped one raises ``error``."""
    path = Path(directory) / META
    if not os.path.lexists(path):
        raise error(f"{path} not found: not a loraexport output directory")
    return check_export_meta(read_json(path, error), path, error)


def end_ids(model: dict) -> list[int]:
    """Every end-of-sequence id of a checked description's ``model``: ``eos_token_ids`` (all that
    config.json and generation_config.json list), else ``special_tokens.eos`` alone."""
    ends = model.get("eos_token_ids")
    if ends:
        return list(ends)
    eos = model.get("special_tokens", {}).get("eos")
    return [] if eos is None else [eos]


def graph_files(meta: dict) -> list[str]:
    """The graph files of an export, by its kind (never by names loraexport.json gives)."""
    kind = meta.get("model", {}).get("kind") if isinstance(meta.get("model"), dict) else None
    return ["encoder.onnx", "decoder.onnx"] if kind == "seq2seq" else ["model.onnx"]
