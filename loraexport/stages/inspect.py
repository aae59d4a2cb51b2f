"""The inspect stage: what a path is — a PEFT adapter, a model directory or a loraexport
output — and its facts, every file it reads checked as untrusted."""

from __future__ import annotations

from pathlib import Path

from loraexport.artifact.schema import META
from loraexport.core.io import require_dir
from loraexport.errors import InvalidInputError
from loraexport.lora.adapter import CONFIG_NAME, Adapter
from loraexport.lora.inject import linear_names
from loraexport.models.registry import load_base


def inspect_path(path: str | Path) -> dict:
    """Say what ``path`` is — a PEFT adapter, a model directory, or a loraexport output — and its facts."""
    d = require_dir(path, "path")
    meta = _output_meta(d / META)
    if "graphs" in meta:  # an export; other outputs only list their files
        info = {
            "kind": "loraexport output",
            "path": str(d),
            "model": meta["model"]["kind"],
            "family": meta["model"].get("family"),
            "mode": meta.get("mode"),
            "opset": meta.get("opset"),
            "files": sorted(meta.get("files", {})),
            "graphs": meta["graphs"],
        }
        if (d / "report.json").is_file():
            info["parity_passed"] = _report_passed(d / "report.json")
        return info
    if (d / CONFIG_NAME).is_file():
        adapter = Adapter.load(d)
        c = adapter.config
        return {
            "kind": "PEFT LoRA adapter",
            "path": str(d),
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "use_rslora": c.use_rslora,
            "use_dora": c.use_dora,
            "target_modules": c.target_modules,
            "modules": len(adapter.weights),
            "parameters": adapter.num_parameters,
            "base_model_name_or_path": c.base_model_name_or_path,
        }
    if (d / "config.json").is_file():
        family, model = load_base(d)
        names = linear_names(model)
        return {
            "kind": "model",
            "path": str(d),
            "family": family.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "linear_layers": len(names),
            "linear_names": sorted({n.rsplit(".", 1)[-1] for n in names}),
        }
    raise InvalidInputError(
        f"{d}: neither an adapter (adapter_config.json), a model (config.json) nor a loraexport output"
    )


def _output_meta(path: Path) -> dict:
    """``loraexport.json`` of a folder loraexport wrote ({} when there is none), read bounded and
    checked: an export description (it has ``graphs``) key by key, any other as a manifest."""
    from loraexport.artifact.schema import check_export_meta
    from loraexport.core.io import read_json
    from loraexport.core.untrusted import short_repr
    from loraexport.errors import ModelFormatError

    if not path.is_file():
        return {}
    meta = read_json(path, ModelFormatError)
    if not isinstance(meta, dict) or "graphs" in meta:
        return check_export_meta(meta, path, ModelFormatError)  # names the file and the key
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ModelFormatError(
            f"{path}: 'files' must be an object of sha256 digests, not {short_repr(files)}"
        )
    return meta


def _report_passed(path: Path) -> bool | None:
    """``passed`` of a ``report.json`` verify wrote: true, false, or null (parity not run)."""
    from loraexport.core.io import read_json
    from loraexport.core.untrusted import short_repr
    from loraexport.errors import ModelFormatError

    report = read_json(path, ModelFormatError)
    if not isinstance(report, dict):
        raise ModelFormatError(f"{path}: not a loraexport report (a JSON object), but {short_repr(report)}")
    passed = report.get("passed")
    if passed is not None and not isinstance(passed, bool):
        raise ModelFormatError(f"{path}: 'passed' must be true, false or null, not {short_repr(passed)}")
    return passed
