"""The adapter-mode parts of the export stage and ``convert-adapter`` (``export.adapter`` says
how the graph takes adapters per request)."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from loraexport.artifact.output.plan import is_adapter_file, plan_files
from loraexport.artifact.output.write import write_files
from loraexport.artifact.schema import META, read_export_meta
from loraexport.core.io import sha256_file
from loraexport.errors import AdapterMismatchError, InvalidInputError, UnsupportedAdapterError, UsageError
from loraexport.export.adapter import (
    ADAPTER_SUFFIX,
    GraphLora,
    adapter_tensors,
    check_exposed,
    expose_factors,
    probe_factors,
    write_adapter_file,
)
from loraexport.lora.adapter import Adapter
from loraexport.lora.inject import lora_layers
from loraexport.stages.merge import merged_model, unmerged_model

NO_ADAPTER = "none"  # verification's name for the graph with no adapter active: no adapter's


def probe_model(base: nn.Module, adapters: list[Adapter], max_rank: int | None, storage=None):
    """(the base with LoRA branches holding probe factors at the graph's rank, scaling 1; the
    probes; the rank). The modules are the first adapter's; the rank the largest of every
    adapter's modules and ``max_rank``. ``storage`` (a torch half dtype, ``--dtype``): the
    base's weights rounded to it first, so the file stores them in it exactly; the probes, and
    so the adapter inputs, stay float32."""
    for a in adapters:
        refuse_dora(a)
        if a.replacements:
            name = next(iter(a.replacements))
            raise AdapterMismatchError(
                f"{a.path}: replaces base tensor {name} (bias or modules_to_save): an onnxruntime adapter "
                "holds LoRA factors only; use --mode merged"
            )
    rank = max(a.config.rank(m) for a in adapters for m in a.weights)
    if max_rank is not None and max_rank < rank:
        raise InvalidInputError(f"--max-rank {max_rank} is below the adapters' largest rank, {rank}")
    rank = max_rank or rank
    if storage is not None:
        base = merged_model(base, [], storage_dtype=storage)[0]
    model = unmerged_model(base, _template(adapters, rank))
    layers = lora_layers(model)
    shapes = {m: (layer.in_features, layer.out_features) for m, layer in layers.items()}
    probes = probe_factors(shapes, rank)
    for m, layer in layers.items():
        a, b = probes[m]
        layer.lora_A = nn.Parameter(torch.from_numpy(a), requires_grad=False)
        layer.lora_B = nn.Parameter(torch.from_numpy(b), requires_grad=False)
        layer.r, layer.scaling = rank, 1.0
    return model, probes, rank


def _template(adapters: list[Adapter], rank: int) -> Adapter:
    """An adapter of zeros on every module any of ``adapters`` adapts (their union, in any
    order), at ``rank``: what the graph is built from."""
    shapes: dict[str, tuple[int, int]] = {}
    for a in adapters:
        for m, (down, up) in a.weights.items():
            shape = (down.shape[1], up.shape[0])
            if shapes.setdefault(m, shape) != shape:
                raise AdapterMismatchError(
                    f"{m}: the adapters disagree on its shape ({shapes[m]} and {shape})"
                )
    config = dataclasses.replace(
        adapters[0].config,
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(shapes),
        rank_pattern={},
        alpha_pattern={},
        use_rslora=False,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        modules_to_save=None,
        bias="none",
    )
    zeros = {m: (torch.zeros(rank, i), torch.zeros(o, rank)) for m, (i, o) in shapes.items()}
    return Adapter(config, zeros)


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


def _export_files(onnx_dir: Path, meta: dict) -> list[Path]:
    """The files of an export that convert-adapter must not write over: its description, its
    graphs and their data, and the adapter files it lists (their sha256 is in its description).
    A new adapter file may go beside them."""
    listed = {e.get("file") for e in meta.get("adapter_files") or [] if isinstance(e, dict)}
    return [
        p
        for p in onnx_dir.iterdir()
        if p.name == META or p.name.endswith((".onnx", ".onnx.data")) or p.name in listed
    ]


def convert_adapter(
    adapter_dir: str | Path,
    onnx_dir: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """A PEFT adapter as an onnxruntime adapter file for an adapter-mode export; checked against
    the graph (names, shapes, rank) before anything is written. Returns what was written."""
    if not str(out).endswith(ADAPTER_SUFFIX):
        raise UsageError(f"--out {out} must end in {ADAPTER_SUFFIX} (the name loraexport.runtime looks for)")
    onnx_dir = Path(onnx_dir)
    meta = read_export_meta(onnx_dir, InvalidInputError)
    out_plan = plan_files(
        [out],
        force=force,
        inputs={"ADAPTER_DIR": adapter_dir, "--onnx": _export_files(onnx_dir, meta)},
        label="--out",
        previous=is_adapter_file,
    )
    graph = GraphLora.from_meta(meta, str(onnx_dir))
    adapter = Adapter.load(adapter_dir, allow_pickle)
    tensors = adapter_file_tensors(adapter, graph)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter"
        write_adapter_file(tensors, path)
        data = path.read_bytes()
    write_files(out_plan, {out_plan.targets[0]: data})
    target, modules = out_plan.targets[0], len(tensors) // 2
    return {"file": str(target), "modules": modules, "bytes": len(data)}
