"""An adapter-mode export's adapter files: the probe factors of the exported graphs made graph
inputs (``export.adapter.expose_factors``), and one ``.onnx_adapter`` per PEFT adapter, each
checked against the graph (names, shapes, rank) and recorded in ``loraexport.json``."""

from __future__ import annotations

import re
from pathlib import Path

from loraexport.core.io import sha256_file
from loraexport.errors import AdapterMismatchError, UnsupportedAdapterError
from loraexport.export.adapter import (
    ADAPTER_SUFFIX,
    GraphLora,
    adapter_tensors,
    check_exposed,
    expose_factors,
    write_adapter_file,
)
from loraexport.lora.adapter import Adapter

NO_ADAPTER = "none"  # verification's name for the graph with no adapter active: no adapter's


def expose(out_dir: Path, graphs: list[str], probes: dict, rank: int) -> GraphLora:
    """The probes of each exported graph made inputs (``export.adapter.expose_factors``)."""
    found: dict[str, dict] = {}
    for g in graphs:
        found.update(expose_factors(out_dir / f"{g}.onnx", probes))
    check_exposed(found, probes)
    return GraphLora(rank, found)


def describe_adapters(
    out_dir: Path, graphs: list[str], probes: dict, rank: int, adapters, meta: dict
) -> None:
    """After an adapter-mode export into ``out_dir``: the probes made inputs, one adapter file
    per adapter, and both recorded in ``meta`` (``loraexport.json``)."""
    graph = expose(out_dir, graphs, probes, rank)
    meta["lora_inputs"] = {"rank": graph.rank, "inputs": graph.inputs}
    meta["adapter_files"] = write_adapter_files(out_dir, adapters, graph)


def refuse_dora(adapter: Adapter) -> None:
    if adapter.config.use_dora:
        raise UnsupportedAdapterError(
            f"{adapter.path}: a DoRA adapter cannot be an onnxruntime adapter file (its magnitude "
            "rescales the whole weight; the graph's LoRA inputs hold A and B only); use --mode merged"
        )


def adapter_file_tensors(adapter: Adapter, graph: GraphLora) -> dict:
    refuse_dora(adapter)
    weights = {m: (a.float().numpy(), b.float().numpy()) for m, (a, b) in adapter.weights.items()}
    scaling = {m: adapter.config.scaling(m) for m in adapter.weights}
    if adapter.replacements:
        raise AdapterMismatchError(
            f"{adapter.path}: replaces base tensor {next(iter(adapter.replacements))} (bias or "
            "modules_to_save): an onnxruntime adapter holds LoRA factors only"
        )
    return adapter_tensors(weights, scaling, graph)


def file_name(adapter: Adapter, taken: set[str]) -> str:
    """``<adapter folder name>.onnx_adapter``, made safe and unique."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(adapter.path or "adapter").name).lstrip(".") or "adapter"
    name, i = f"{stem}{ADAPTER_SUFFIX}", 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}{ADAPTER_SUFFIX}"
    taken.add(name)
    return name


def write_adapter_files(out_dir: Path, adapters: list[Adapter], graph: GraphLora) -> list[dict]:
    """One ``.onnx_adapter`` per adapter in ``out_dir``; their entries for ``loraexport.json``."""
    entries, taken = [], {f"{NO_ADAPTER}{ADAPTER_SUFFIX}"}
    for adapter in adapters:
        name = file_name(adapter, taken)
        write_adapter_file(adapter_file_tensors(adapter, graph), out_dir / name)
        entries.append(
            {
                "name": name[: -len(ADAPTER_SUFFIX)],
                "file": name,
                "sha256": sha256_file(out_dir / name),
                "source_sha256": adapter.sha256() if adapter.path is not None else None,
            }
        )
    return entries
