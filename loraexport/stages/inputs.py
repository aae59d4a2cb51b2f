"""Loading a run's inputs once, checked once: the base (family, model, tokenizer), the adapters
(each checked against the base, so they travel checked), their weights; and the small facts
every stage records about them (provenance, the machine, where the output goes)."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from loraexport.artifact.output import OutputPlan, plan_output
from loraexport.core.enums import ExportMode
from loraexport.core.io import read_json, sha256_dir
from loraexport.core.threads import cores
from loraexport.errors import AdapterFormatError, UnsupportedAdapterError
from loraexport.lora.adapter import CONFIG_NAME, Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.weights import adapter_weights, check_dora
from loraexport.models.base import ModelFamily
from loraexport.models.registry import load_model_dir
from loraexport.training.data import read_pairs

Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


@dataclass
class Loaded:
    family: ModelFamily
    base: nn.Module
    adapters: list[Adapter]  # each already checked against ``base`` (``Adapter.check_fits``)
    weights: list[float] | None = None  # per adapter; None: 1.0 each
    tokenizer: object | None = None  # the base's (``ModelFamily.tokenizer``); None: it has none

    @property
    def adapter_weights(self) -> list[float]:
        return self.weights or [1.0] * len(self.adapters)


def as_list(paths) -> list:
    return list(paths) if isinstance(paths, (list, tuple)) else [paths]


def check_weights(adapters: list, weights: list[float] | None) -> list[float] | None:
    """``weights`` is None (1.0 each) or one finite number per adapter (``lora.weights``)."""
    return adapter_weights(len(adapters), weights) if weights else None


def load_inputs(
    base: str | Path,
    adapters: list[str | Path],
    allow_pickle: bool = False,
    weights: list[float] | None = None,
) -> Loaded:
    """The base and adapters, loaded and checked against each other once. The tensors an adapter
    replaces (modules_to_save: a classifier head trained from scratch) may be absent from the base."""
    weights = check_weights(adapters, weights)
    loaded = [Adapter.load(a, allow_pickle) for a in adapters]
    model_dir = load_model_dir(base, supplied={n for a in loaded for n in a.replacements})
    check_dora(loaded, weights)
    for a in loaded:
        a.check_fits(model_dir.model)
    return Loaded(model_dir.family, model_dir.model, loaded, weights, model_dir.tokenizer)


def check_dora_mode(adapters: list, mode: ExportMode, keep_adapter: bool, optimize: bool = False) -> None:
    """DoRA adapters export merged (any precision, fused or streamed) or as a plain unmerged graph.
    Where the graph keeps bare LoRA branches (``--mode adapter``, ``--keep-adapter``, an unmerged
    ``--optimize`` graph) a DoRA adapter cannot be kept: its magnitude rescales the whole weight.
    Read from adapter_config.json before any weight is."""
    where = (
        "--mode adapter"
        if mode is ExportMode.ADAPTER
        else "--keep-adapter"
        if keep_adapter
        else "--mode unmerged --optimize"
        if mode is ExportMode.UNMERGED and optimize
        else None
    )
    if where is None:
        return
    for path in adapters:
        cfg = read_json(Path(path) / CONFIG_NAME, AdapterFormatError) if Path(path).is_dir() else None
        if isinstance(cfg, dict) and LoraConfig.from_dict(cfg).use_dora:
            raise UnsupportedAdapterError(
                f"{path} is a DoRA adapter: {where} keeps LoRA branches beside the base, and DoRA's "
                "magnitude rescales the whole weight; export it merged (the default)"
            )


def check_eval_data(path: str | Path | None) -> None:
    """Read the generation prompts once before any work: a bad file fails in a second, not
    after the merge and export."""
    if path is not None:
        read_pairs(path)


def plan(out: str | Path, force: bool, log: Log, inputs: dict) -> OutputPlan:
    """Check ``out`` against every input before any work (``output.plan_output``)."""
    result = plan_output(out, force=force, inputs=inputs)
    for stale in result.removed_stale:
        log(f"removed {stale.name}, left by a run that was killed")
    return result


# ---- what reports and loraexport.json say about the inputs -------------------------------------------
def adapter_info(a: Adapter, weight: float = 1.0) -> dict:
    return {
        "weight": weight,
        "path": str(a.path),
        "sha256": a.sha256(),
        "r": a.config.r,
        "alpha": float(a.config.lora_alpha),
        "targets": a.config.target_modules,
        "modules": len(a.weights),
        "use_rslora": a.config.use_rslora,
        "use_dora": a.config.use_dora,
        "parameters": a.num_parameters,
    }


def adapter_provenance(loaded: Loaded) -> list[dict]:
    """Each adapter's path, sha256 and the weight it was merged with."""
    return [
        {"path": str(a.path), "sha256": a.sha256(), "weight": w}
        for a, w in zip(loaded.adapters, loaded.adapter_weights, strict=True)
    ]


def model_provenance(path: str | Path, digest: str | None = None) -> dict:
    """The model folder's path and sha256 (``digest``, when computed already: ``core.io.DirDigest``)."""
    return {"path": str(path), "sha256": digest or sha256_dir(Path(path))}


def base_info(path: str | Path, family: ModelFamily, model: nn.Module) -> dict:
    return {
        "path": str(path),
        "family": family.name,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": cores(), "platform": platform.platform()}
