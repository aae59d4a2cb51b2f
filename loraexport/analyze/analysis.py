"""``analyze``: the figures of ``spectra`` for every adapted module of an adapter on its base,
summarised per layer and per projection type, and (``compare``) the subspace similarity
with a second adapter. The result is the JSON-ready dict written as ``analysis.json``.
"""

from __future__ import annotations

import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from loraexport.analyze.spectra import (
    ENERGY_THRESHOLD,
    RANDOM_DRAWS,
    module_figures,
    subspace_similarity,
)
from loraexport.artifact.output import plan_output
from loraexport.core.progress import Progress
from loraexport.errors import AdapterFormatError, AdapterMismatchError, InvalidInputError
from loraexport.lora.adapter import Adapter
from loraexport.lora.inject import is_transposed
from loraexport.models.registry import load_base

SCHEMA = 1
# Seeds: a signed 64-bit integer, which every JSON reader of analysis.json can hold (torch itself
# takes up to 2**64 - 1 and fails beyond with "Overflow when unpacking long long").
MAX_SEED = 2**63 - 1
MAX_DRAWS = 10_000  # = the CLI's --draws bound; each draw is a random subspace per module
EFFECTIVE_RANK = "exp(entropy of σᵢ/Σσ) (Roy & Vetterli 2007): 1 = one direction, k = k equal directions"
MAGNITUDE = (
    "DoRA only: m₀ = ‖W0‖ per output row (m's value before training); magnitude_change = "
    "‖m − m₀‖₂ / ‖m₀‖₂, magnitude_max_change = max |mᵢ/m₀ᵢ − 1|; dora_delta_fro = ‖W' − W0‖_F, "
    "the merged weight's whole change (W' = m ⊙ (W0 + ΔW)/‖W0 + ΔW‖ per row)"
)
RANK_TOLERANCE = (
    "rank_used = the singular values of ΔW above max(out, in)·eps·σ₁ (float64 eps), ΔW's numerical "
    "rank: the k of proj_delta, proj_top and proj_random; 0 for ΔW = 0, whose projections are null"
)
_LAYER = re.compile(r"^(?P<layer>.*?\.\d+)\.(?P<type>.+)$")  # 'decoder.layers.1' + 'self_attn.q'


def split_path(path: str) -> tuple[str, str]:
    """(layer, projection type) of a module path: the split is after its first numeric part.

    ``decoder.layers.1.cross_attn.q`` → (``decoder.layers.1``, ``cross_attn.q``);
    ``transformer.h.3.attn.c_attn`` → (``transformer.h.3``, ``attn.c_attn``); a path without a
    layer index is its own type, in layer ``-``.
    """
    m = _LAYER.match(path)
    return (m["layer"], m["type"]) if m else ("-", path)


def analyze(
    base: str | Path,
    adapter: str | Path,
    out: str | Path | None = None,
    *,
    compare: str | Path | None = None,
    force: bool = False,
    draws: int = RANDOM_DRAWS,
    seed: int = 0,
    plots: bool = True,
    allow_pickle: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Analyse ``adapter`` on ``base``; with ``out``, write analysis.json, analysis.md and plots.

    Args:
        base: base model directory (any supported family).
        adapter: PEFT adapter directory that fits ``base``.
        out: output directory, written atomically; None computes only.
        compare: a second adapter for the same base: φ grids over the modules both adapt.
        force: replace ``out`` if it exists.
        draws: random subspaces averaged for ``proj_random``.
        seed: seed of those random subspaces (the same draws for every module of one shape).
        plots: draw PNGs when matplotlib is installed.

    Raises:
        InvalidInputError (and subclasses): unreadable inputs, an adapter that does not fit the
            base, a ``compare`` adapter sharing no module with ``adapter``, ``out`` existing.
    """
    if not 1 <= draws <= MAX_DRAWS:
        raise InvalidInputError(f"random draws must be in [1, {MAX_DRAWS}], got {draws}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be in [0, 2**63 - 1], got {seed}")
    plan = None
    if out is not None:  # before any work
        plan = plan_output(
            out, force=force, inputs={"--base": base, "--adapter": adapter, "--compare": compare}
        )
    t0 = time.perf_counter()
    first = Adapter.load(adapter, allow_pickle)
    second = Adapter.load(compare, allow_pickle) if compare is not None else None
    family, model = load_base(base)
    first.check_fits(model)
    if second is not None:
        try:
            second.check_fits(model)
        except (AdapterMismatchError, AdapterFormatError) as e:
            raise type(e)(f"--compare adapter {compare}: {e}") from e
    order = [name for name, _ in model.named_modules()]
    paths = [p for p in order if p in first.weights]
    modules = []
    with torch.no_grad(), Progress(len(paths), "analyze", "modules", show_progress) as bar:
        for path in paths:
            modules.append(_module_entry(model, first, path, draws, seed))
            bar.update(1)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "versions": _versions(),
        "base": {"path": str(base), "family": family.name},
        "adapter": _adapter_info(first),
        "settings": {
            "random_draws": draws,
            "seed": seed,
            "effective_rank": EFFECTIVE_RANK,
            "energy_threshold": ENERGY_THRESHOLD,
            "rank_tolerance": RANK_TOLERANCE,
            **({"magnitude": MAGNITUDE} if first.config.use_dora else {}),
        },
        "modules": modules,
        "layers": summarise(modules, "layer"),
        "types": summarise(modules, "type"),
        "compare": None,
    }
    if second is not None:
        result["compare"] = _compare(first, second, [p for p in order if p in second.weights])
    result["seconds"] = time.perf_counter() - t0
    log(f"analysed {len(modules)} modules in {result['seconds']:.1f} s")
    if out is not None:
        from loraexport.analyze.report import write_analysis

        write_analysis(result, plan, plots=plots)
    return result


def _module_entry(model: torch.nn.Module, adapter: Adapter, path: str, draws: int, seed: int) -> dict:
    mod = model.get_submodule(path)
    w = mod.weight.detach()
    w = w.T if is_transposed(mod) else w  # (out, in) always
    a, b = adapter.weights[path]
    figures = module_figures(w, a, b, adapter.config.scaling(path), draws=draws, seed=seed)
    layer, kind = split_path(path)
    entry = {"module": path, "layer": layer, "type": kind, "shape": list(w.shape), **asdict(figures)}
    if path in adapter.magnitudes:
        entry["dora"] = magnitude_figures(w, a, b, adapter.config.scaling(path), adapter.magnitudes[path])
    return entry


def magnitude_figures(
    w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, m: torch.Tensor
) -> dict[str, float]:
    """How DoRA's trained magnitude moved from its start ‖W0‖ (per output row), and the merged
    weight's whole change, in float64; ``w0`` is (out, in)."""
    w0 = w0.double()
    m0 = torch.linalg.vector_norm(w0, dim=1)  # (out,)
    m = m.double()
    wide = w0 + scaling * (b.double() @ a.double())
    merged = wide * (m / torch.linalg.vector_norm(wide, dim=1)).unsqueeze(1)
    ratio = m / m0
    return {
        "magnitude_change": float(torch.linalg.vector_norm(m - m0) / torch.linalg.vector_norm(m0)),
        "magnitude_max_change": float((ratio - 1).abs().max()),
        "dora_delta_fro": float(torch.linalg.matrix_norm(merged - w0)),
    }


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarise(modules: list[dict], key: str) -> list[dict[str, Any]]:
    """One row per distinct ``key`` ("layer" or "type"), in order of first appearance.

    Norms are combined as one Frobenius norm over the group (root of the sum of squares);
    the other figures are means over the group's modules.
    """
    groups: dict[str, list[dict]] = {}
    for m in modules:
        groups.setdefault(m[key], []).append(m)
    rows = []
    for name, ms in groups.items():
        rows.append(
            {
                key: name,
                "modules": len(ms),
                "delta_fro": math.sqrt(sum(m["delta_fro"] ** 2 for m in ms)),
                "w_fro": math.sqrt(sum(m["w_fro"] ** 2 for m in ms)),
                "effective_rank_mean": _mean([m["effective_rank"] for m in ms]),
                "proj_delta_mean": _mean([m["proj_delta"] for m in ms]),
                "proj_top_mean": _mean([m["proj_top"] for m in ms]),
                "proj_random_mean": _mean([m["proj_random"] for m in ms]),
                "amplification_mean": _mean([m["amplification"] for m in ms]),
                **(
                    {"magnitude_change_mean": _mean([m["dora"]["magnitude_change"] for m in ms])}
                    if all("dora" in m for m in ms)
                    else {}
                ),
            }
        )
    return rows


def _compare(first: Adapter, second: Adapter, second_paths: list[str]) -> dict[str, Any]:
    common = [p for p in second_paths if p in first.weights]
    if not common:
        raise AdapterMismatchError(
            f"--compare adapter adapts none of the modules of --adapter (it targets "
            f"{second.config.target_modules!r}, --adapter targets {first.config.target_modules!r})"
        )
    entries = []
    for path in common:
        grid = subspace_similarity(first.weights[path][0], second.weights[path][0])
        k1, k2 = grid.shape
        n_in = first.weights[path][0].shape[1]
        layer, kind = split_path(path)
        entries.append(
            {
                "module": path,
                "layer": layer,
                "type": kind,
                "rank_1": k1,
                "rank_2": k2,
                "in_features": n_in,
                "phi_1_1": float(grid[0, 0]),
                "phi_full": float(grid[-1, -1]),
                "phi_random_full": max(k1, k2) / n_in,  # E[φ(r₁, r₂)] for independent random subspaces
                "phi": grid.tolist(),
            }
        )
    by_type: dict[str, list[dict]] = {}
    for e in entries:
        by_type.setdefault(e["type"], []).append(e)
    types = []
    for kind, es in by_type.items():
        row: dict[str, Any] = {
            "type": kind,
            "modules": len(es),
            "phi_1_1_mean": _mean([e["phi_1_1"] for e in es]),
            "phi_full_mean": _mean([e["phi_full"] for e in es]),
            "phi_random_full": _mean([e["phi_random_full"] for e in es]),
            "phi_mean": None,
        }
        if len({(e["rank_1"], e["rank_2"]) for e in es}) == 1:  # a mean grid needs one shape
            row["phi_mean"] = torch.tensor([e["phi"] for e in es], dtype=torch.float64).mean(0).tolist()
        types.append(row)
    return {
        "adapter": _adapter_info(second),
        "basis": "right singular vectors of lora_A (the paper's U_A), ordered by A's singular values",
        "modules": entries,
        "types": types,
        "only_in_adapter": sorted(set(first.weights) - set(common)),
        "only_in_compare": sorted(set(second.weights) - set(common)),
    }


def _adapter_info(adapter: Adapter) -> dict[str, Any]:
    c = adapter.config
    return {
        "path": str(adapter.path),
        "sha256": adapter.sha256(),
        "r": c.r,
        "lora_alpha": c.lora_alpha,
        "use_rslora": c.use_rslora,
        "use_dora": c.use_dora,
        "target_modules": c.target_modules,
        "modules": len(adapter.weights),
        "parameters": adapter.num_parameters,
        "replaced_parameters": sorted(adapter.replacements),  # biases, modules_to_save: not analysed
    }


def _versions() -> dict[str, str]:
    from loraexport._version import __version__

    return {"loraexport": __version__, "torch": torch.__version__, "python": platform.python_version()}
