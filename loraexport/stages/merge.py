"""The merge stage: ``W' = W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ``, streamed over a checkpoint (``merge``) or as
models that share the base's tensors (``merged_model``, and the unmerged reference)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraexport.artifact.manifest import Hasher
from loraexport.artifact.output import write_output
from loraexport.artifact.provenance import versions
from loraexport.core.dtypes import torch_dtype
from loraexport.core.io import require_dir, write_json
from loraexport.core.progress import Progress
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import MergeStats, merge_state_dict
from loraexport.lora.stream import checkpoint_shards, stream_merge
from loraexport.lora.views import merged_view, unmerged_view
from loraexport.spec import Run, run_of
from loraexport.stages.inputs import adapter_info, as_list, check_weights, plan


def unmerged_model(
    base: nn.Module, adapters: Adapter | list[Adapter], weights: list[float] | None = None
) -> nn.Module:
    """``base`` with the adapters' LoRA branches active (the parity reference); shares the
    base's untouched tensors (``lora.views``)."""
    return unmerged_view(base, as_list(adapters), weights)


def merged_model(
    base: nn.Module,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, MergeStats]:
    """``base`` with ``W0 + Σ w·s·B·A`` in place of the adapted weights (no LoRA modules).

    Shares every tensor the merge leaves alone with ``base`` (``lora.views``): one extra copy
    of the adapted weights, not of the model.
    """
    state = base.state_dict()
    merged_state, stats = merge_state_dict(state, adapters, weights, storage_dtype=storage_dtype)
    return merged_view(base, state, merged_state), stats


def merge(
    base: str | Path,
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    run: Run | None = None,
    **run_fields,
) -> MergeStats:
    """Merge adapter(s) into the safetensors checkpoint in ``base``; write ``out`` in its layout.

    Streams tensor by tensor (``lora.stream``): no model is built, memory stays bounded by the
    largest tensor, untargeted tensors are copied without being decoded. ``merge.json`` records
    per module max|ΔW| and the error of the final cast. ``run`` (or force, allow_pickle, log,
    show_progress: a bar by default, drawn only on a terminal).
    """
    run = run_of(run, {"show_progress": True} | run_fields) if run is None else run_of(run, run_fields)
    weights = check_weights(adapters, weights)
    storage = torch_dtype(dtype)
    out_plan = plan(out, run.force, run.log, {"--base": base, "--adapter": adapters})
    base_dir = require_dir(base, "base model directory")
    _check_config(base_dir)
    loaded = [Adapter.load(a, run.allow_pickle) for a in adapters]
    shards, _ = checkpoint_shards(base_dir)
    total = sum((base_dir / s).stat().st_size for s in shards)
    hasher = Hasher()  # shards are hashed for the manifest while the next one is merged
    with (
        write_output(out_plan, hasher) as tmp,
        Progress(total, "merge", "B", run.show_progress) as bar,
    ):
        stats = stream_merge(
            base_dir,
            loaded,
            tmp,
            weights,
            storage_dtype=storage,
            on_bytes=bar.update,
            on_file=hasher.submit,
        )
        write_json(
            tmp / "merge.json",
            {
                "versions": versions(),
                "base": {"path": str(base), "family": "safetensors checkpoint", "parameters": 0},
                "adapters": [
                    adapter_info(a, w) for a, w in zip(loaded, weights or [1.0] * len(loaded), strict=True)
                ],
                "merge": stats.to_json(),
            },
        )
    return stats


def _check_config(base_dir: Path) -> None:
    """The base's config.json, copied into the output, is checked as loading it would check it
    (``models.checks.check_hf_config``): one a loader would refuse is refused before the merge,
    not after it wrote a checkpoint nothing can load. A checkpoint without one merges as it is."""
    from loraexport.models.checks import read_checked_config

    path = base_dir / "config.json"
    if path.exists() or path.is_symlink():
        read_checked_config(path)
