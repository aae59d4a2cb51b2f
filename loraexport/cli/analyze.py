"""``loraexport analyze`` and ``loraexport sweep``: parse, call ``loraexport.analyze``, print."""

from __future__ import annotations

import json

import click

from loraexport.cli.options import PATH as _path
from loraexport.cli.options import force_option, json_option, pickle_option
from loraexport.cli.output import log
from loraexport.cli.types import MAX_RANK, MAX_SEED, RANKS, IntList, PositiveInt, Seed  # noqa: F401 (MAX_SEED, RANKS: tests)

DRAWS_HELP = "Random subspaces averaged for the random baseline."


def _g(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


BUDGET_RANK = "Rank of a single target type; n types get budget-rank/n each (equal parameters)."


@click.command()
@click.option("--base", required=True, type=_path, help="Base model directory.")
@click.option("--adapter", required=True, type=_path, help="PEFT adapter directory.")
@click.option(
    "--compare",
    type=_path,
    help="A second adapter for the same base (another rank or seed): subspace similarity grids.",
)
@click.option("--out", required=True, type=_path, help="Output directory (written atomically).")
@click.option("--draws", default=10, show_default=True, type=PositiveInt(10_000), help=DRAWS_HELP)
@click.option("--seed", default=0, show_default=True, type=Seed(), help="Seed of the random subspaces.")
@click.option("--no-plots", is_flag=True, help="Write analysis.json and analysis.md only.")
@force_option
@pickle_option
@json_option("Print analysis.json on stdout.")
@click.pass_context
def analyze(ctx, out, no_plots, as_json, **options):
    """Analyse ΔW = s·B·A of an adapter against its base weights (LoRA paper, section 7).

    Per adapted module, summarised per layer and per projection type: ‖ΔW‖_F, the singular
    values of ΔW, its effective rank and energy in the top directions; how much of W lies in
    ΔW's subspace (‖UᵀWV‖_F, U, V for its nonzero singular values) against W's own top
    directions and random ones; the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F. With --compare,
    the normalized subspace similarity φ(i, j) between the two adapters' lora_A. Writes
    analysis.json, analysis.md and PNG plots (with matplotlib) to --out.

    \b
    Example:
      loraexport analyze --base samples/base --adapter runs/demo-adapter --out runs/analysis
    """
    from loraexport.analyze.analysis import analyze as analyze_api

    # options: base, adapter, compare, draws, seed, force, allow_pickle (analyze_api's names)
    result = analyze_api(
        out=out, plots=not no_plots, show_progress=not ctx.obj["quiet"], log=log(ctx), **options
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    width = max(len(t["type"]) for t in result["types"])
    click.echo(f"{'type':<{width}}  modules  ‖ΔW‖_F     eff.rank  amplification  ΔW/random")
    for t in result["types"]:
        ratio = (
            t["proj_delta_mean"] / t["proj_random_mean"]
            if t["proj_delta_mean"] is not None and t["proj_random_mean"]
            else None
        )
        click.echo(
            f"{t['type']:<{width}}  {t['modules']:>7}  {_g(t['delta_fro']):<9}  "
            f"{_g(t['effective_rank_mean'], 3):<8}  {_g(t['amplification_mean'], 3):<13}  {_g(ratio, 3)}"
        )
    if result["compare"]:
        for t in result["compare"]["types"]:
            click.echo(
                f"φ {t['type']}: φ(1,1) {_g(t['phi_1_1_mean'], 3)}, φ(r₁,r₂) {_g(t['phi_full_mean'], 3)} "
                f"(random {_g(t['phi_random_full'], 3)})"
            )
    click.echo(f"analysis written to {out / 'analysis.md'} (and analysis.json)")
    if result.get("plots_note") and not no_plots:
        log(ctx)(f"note: {result['plots_note']}")


@click.command()
@click.option("--base", required=True, type=_path, help="Base model directory (the reference Transformer).")
@click.option(
    "--data",
    required=True,
    type=_path,
    help='Training data, JSON Lines of {"source": ..., "target": ...}.',
)
@click.option(
    "--eval-data",
    type=_path,
    help="Held-out data; default: hold out 10% of --data.",
)
@click.option("--out", required=True, type=_path, help="Output directory (written atomically).")
@click.option(
    "--steps", default=100, show_default=True, type=PositiveInt(10**7), help="Training steps per adapter."
)
@click.option(
    "--seeds", default=3, show_default=True, type=PositiveInt(100), help="Training runs per configuration."
)
@click.option("--budget-rank", default=8, show_default=True, type=PositiveInt(MAX_RANK), help=BUDGET_RANK)
@click.option(
    "--ranks",
    type=IntList(MAX_RANK),
    help="Ranks tried on {q,v}, comma-separated.  [default: 1,2,4,8,64, those at most d_model]",
)
@force_option
@json_option("Print sweep.json on stdout.")
@click.pass_context
def sweep(ctx, out, as_json, **options):
    """Train adapters for several target sets and ranks; tabulate held-out quality.

    Table 1 (the LoRA paper's table 5): targets {q}, {k}, {v}, {o}, {q,v}, {q,k,v,o} at one
    parameter budget. Table 2 (its table 6): ranks on {q,v}. Each configuration is trained
    --seeds times; sweep.md and sweep.json report held-out exact match and loss, and every
    adapter is kept under --out/adapters/ (for `loraexport analyze --compare`).

    \b
    Example:
      loraexport sweep --base samples/base --data samples/data/sort_train.jsonl \\
          --eval-data samples/data/sort_eval.jsonl --out runs/sweep
    """
    from loraexport.analyze.sweep import sweep as sweep_api

    # options: base, data, eval_data, steps, seeds, budget_rank, ranks, force (sweep_api's names)
    result = sweep_api(out=out, show_progress=not ctx.obj["quiet"], log=log(ctx), **options)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    from loraexport.analyze.sweep import to_markdown

    click.echo(to_markdown(result, title=False))
    click.echo(f"sweep written to {out / 'sweep.md'} (and sweep.json, adapters/)")
