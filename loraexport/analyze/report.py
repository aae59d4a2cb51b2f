"""Write an analysis: ``analysis.json`` (for scripts), ``analysis.md`` (tables for people) and,
when matplotlib (the ``plot`` extra) imports, PNG plots; all into one atomic output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraexport.artifact.output import OutputPlan, plan_output, write_output
from loraexport.core.io import write_json

MD_MAX_MODULES = 96  # analysis.md lists modules one per row up to this many (the JSON has all)
MD_MAX_PHI = 8  # φ(i, i) columns shown in analysis.md


def write_analysis(
    result: dict[str, Any], out: str | Path | OutputPlan, *, force: bool = False, plots: bool = True
) -> None:
    """Write ``result`` (from ``analyze``) to ``out`` (a path, or the plan ``analyze`` checked
    before its work) atomically; sets ``result["plots"]``."""
    plan = out if isinstance(out, OutputPlan) else plan_output(out, force=force)
    with write_output(plan) as tmp:
        result["plots"], result["plots_note"] = [], None
        if plots:
            try:
                result["plots"] = draw_plots(result, tmp)
            except ImportError:
                result["plots_note"] = (
                    "matplotlib is not installed: no plots (pip install 'loraexport[plot]' to get them)"
                )
        else:
            result["plots_note"] = "plots not requested"
        write_json(tmp / "analysis.json", result)
        (tmp / "analysis.md").write_text(to_markdown(result), encoding="utf-8")


# ---- Markdown ------------------------------------------------------------------------------
def _g(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _summary_rows(rows: list[dict], key: str) -> list[list[str]]:
    return [
        [
            f"`{r[key]}`",
            str(r["modules"]),
            _g(r["delta_fro"]),
            _g(r["w_fro"]),
            _g(r["effective_rank_mean"], 3),
            _g(r["proj_delta_mean"]),
            _g(r["proj_top_mean"]),
            _g(r["proj_random_mean"]),
            _g(r["amplification_mean"], 3),
        ]
        for r in rows
    ]


_SUMMARY_HEADER = ["modules", "‖ΔW‖_F", "‖W‖_F", "eff. rank", "‖UᵀWV‖ ΔW", "W top-r", "random", "amplif."]


def to_markdown(result: dict[str, Any]) -> str:
    """``analysis.md``: definitions, per-type, per-layer and per-module tables, comparison."""
    a, s = result["adapter"], result["settings"]
    lines = [
        "# LoRA adapter analysis",
        "",
        f"- base: `{result['base']['path']}` ({result['base']['family']})",
        f"- adapter: `{a['path']}` — r={a['r']}, alpha={a['lora_alpha']}"
        f"{', rsLoRA' if a['use_rslora'] else ''}{', DoRA' if a.get('use_dora') else ''}, "
        f"{a['modules']} modules, {a['parameters']:,} parameters",
        f"- computed in float64 in {result['seconds']:.1f} s",
        *(
            [
                f"- not analysed: {len(a['replaced_parameters'])} parameter(s) the adapter replaces outright "
                "(trained biases, modules_to_save)"
            ]
            if a["replaced_parameters"]
            else []
        ),
        "",
        "ΔW = s·B·A (out × in). U, V: the left/right singular vectors of ΔW's k nonzero singular "
        "values (k = its numerical rank, `rank_used` in analysis.json: r unless ΔW is rank-deficient; "
        "for ΔW = 0 the projection columns are –). "
        "`‖UᵀWV‖ ΔW` is how much of W lies in ΔW's subspace; `W top-r` the same for W's own top-k "
        f"singular vectors (its maximum); `random` for random orthonormal U, V of k columns (mean of "
        f"{s['random_draws']}). Amplification = ‖ΔW‖_F / ‖UᵀWV‖_F for ΔW's subspace "
        "(the LoRA paper's section 7). Effective rank: " + s["effective_rank"] + ". "
        f"rank@{s['energy_threshold']:.0%}: the fewest directions holding that share of ‖ΔW‖_F².",
        *(["", "Magnitude (DoRA): " + s["magnitude"] + "."] if s.get("magnitude") else []),
        "",
        "## Per projection type",
        "",
        *_table(["type", *_SUMMARY_HEADER], _summary_rows(result["types"], "type")),
        "",
        "## Per layer",
        "",
        *_table(["layer", *_SUMMARY_HEADER], _summary_rows(result["layers"], "layer")),
        "",
        "## Per module",
        "",
    ]
    mods = result["modules"]
    rows = [
        [
            f"`{m['module']}`",
            str(m["rank"]),
            _g(m["scaling"], 3),
            _g(m["delta_fro"]),
            _g(m["w_fro"]),
            _g(m["singular_values"][0] if m["singular_values"] else None),
            _g(m["effective_rank"], 3),
            str(m["rank_90"]),
            _g(m["proj_delta"]),
            _g(m["proj_top"]),
            _g(m["proj_random"]),
            _g(m["amplification"], 3),
        ]
        for m in mods[:MD_MAX_MODULES]
    ]
    header = ["module", "r", "s", "‖ΔW‖_F", "‖W‖_F", "σ₁(ΔW)", "eff. rank"]
    header += [f"rank@{s['energy_threshold']:.0%}", "‖UᵀWV‖ ΔW", "W top-r", "random", "amplif."]
    if all("dora" in m for m in mods[:MD_MAX_MODULES]) and mods:  # DoRA: its magnitude beside ΔW
        header += ["Δm/m₀", "max Δm/m₀", "‖W'−W0‖_F"]
        for row, m in zip(rows, mods, strict=False):
            d = m["dora"]
            row += [_g(d["magnitude_change"]), _g(d["magnitude_max_change"]), _g(d["dora_delta_fro"])]
    lines += _table(header, rows)
    if len(mods) > MD_MAX_MODULES:
        lines += ["", f"({len(mods) - MD_MAX_MODULES} more modules in analysis.json)"]
    if result.get("compare"):
        lines += ["", *_compare_markdown(result["compare"])]
    lines += ["", "## Plots", ""]
    if result.get("plots"):
        lines += [f"![{p}]({p})" for p in result["plots"]]
    else:
        lines.append(result.get("plots_note") or "none")
    return "\n".join(lines) + "\n"


def _compare_markdown(c: dict[str, Any]) -> list[str]:
    a = c["adapter"]
    types = c["types"]
    k = max(
        (min(len(t["phi_mean"]), len(t["phi_mean"][0]), MD_MAX_PHI) for t in types if t["phi_mean"]),
        default=0,
    )
    header = ["type", "modules", "φ(r₁,r₂)", "random φ(r₁,r₂)"] + [f"φ({i},{i})" for i in range(1, k + 1)]
    rows = []
    for t in types:
        diag = [
            t["phi_mean"][i][i]
            if t["phi_mean"] and i < min(len(t["phi_mean"]), len(t["phi_mean"][0]))
            else None
            for i in range(k)
        ]
        rows.append(
            [f"`{t['type']}`", str(t["modules"]), _g(t["phi_full_mean"], 3)]
            + [_g(t["phi_random_full"], 3)]
            + [_g(x, 3) for x in diag]
        )
    lines = [
        "## Subspace similarity with the compared adapter",
        "",
        f"Compared with `{a['path']}` (r={a['r']}). φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j), "
        f"U the {c['basis']}: 1 when the top-i and top-j directions overlap fully, about "
        "max(i, j)/in for unrelated random subspaces. Means over each type's modules; every "
        "module's full grid is in analysis.json.",
        "",
        *_table(header, rows),
    ]
    if c["only_in_adapter"] or c["only_in_compare"]:
        lines += [
            "",
            f"Not compared: {len(c['only_in_adapter'])} module(s) only in the adapter, "
            f"{len(c['only_in_compare'])} only in the compared one.",
        ]
    return lines


# ---- plots ---------------------------------------------------------------------------------
def draw_plots(result: dict[str, Any], out: Path) -> list[str]:
    """Spectra, projections and (with a comparison) similarity heatmaps; raises ImportError
    when matplotlib is missing. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    types = [t["type"] for t in result["types"]]
    mods = result["modules"]

    fig, axes = plt.subplots(
        1, len(types), figsize=(4 * len(types), 3.2), squeeze=False, layout="constrained"
    )
    for ax, kind in zip(axes[0], types, strict=True):
        group = [m for m in mods if m["type"] == kind]
        cmap = plt.get_cmap("viridis", max(len(group), 2))
        for i, m in enumerate(group):
            sv = m["singular_values"]
            if sv and sv[0] > 0:
                ax.semilogy(range(1, len(sv) + 1), [x / sv[0] for x in sv], "o-", ms=3, color=cmap(i), lw=1)
        ax.set_title(f"{kind} ({len(group)} modules)", fontsize=9)
        ax.set_xlabel("i")
        ax.set_ylabel("σᵢ(ΔW) / σ₁(ΔW)")
    fig.suptitle("Singular values of ΔW (one line per layer, dark = first)", fontsize=10)
    fig.savefig(out / "spectra.png", dpi=110)
    plt.close(fig)
    files.append("spectra.png")

    layers = [r["layer"] for r in result["layers"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    for kind in types:
        by_layer = {m["layer"]: m for m in mods if m["type"] == kind}
        xs = [i for i, layer in enumerate(layers) if layer in by_layer]
        ms = [by_layer[layers[i]] for i in xs]
        ax1.plot(xs, [m["amplification"] or float("nan") for m in ms], "o-", label=kind, ms=3)
        ax2.plot(
            xs,
            [m["proj_delta"] / m["proj_random"] if m["proj_random"] else float("nan") for m in ms],
            "o-",
            ms=3,
        )
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")  # no more than a random subspace
    for ax, title in (
        (ax1, "amplification ‖ΔW‖ / ‖UᵀWV‖"),
        (ax2, "‖UᵀWV‖: ΔW subspace / random subspace"),
    ):
        ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=10)
    ax1.legend(fontsize=7)
    fig.savefig(out / "projections.png", dpi=110)
    plt.close(fig)
    files.append("projections.png")

    compare = result.get("compare")
    grids = [t for t in (compare or {}).get("types", []) if t["phi_mean"]]
    if grids:
        fig, axes = plt.subplots(
            1, len(grids), figsize=(4 * len(grids) + 1, 3.4), squeeze=False, layout="constrained"
        )
        for ax, t in zip(axes[0], grids, strict=True):
            phi = t["phi_mean"]
            im = ax.imshow(
                phi,
                vmin=0,
                vmax=1,
                cmap="magma",
                aspect="auto",
                origin="upper",
                extent=(0.5, len(phi[0]) + 0.5, len(phi) + 0.5, 0.5),
            )
            ax.set_title(f"{t['type']} (mean of {t['modules']})", fontsize=9)
            ax.set_xlabel("j (compared adapter)")
            ax.set_ylabel("i (adapter)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="φ(i, j)")
        fig.suptitle("Subspace similarity of lora_A's right singular vectors", fontsize=10)
        fig.savefig(out / "similarity.png", dpi=110)
        plt.close(fig)
        files.append("similarity.png")
    return files
