"""``sweep``: the LoRA paper's tables 5 and 6 for the user's own task and base model.

Table "targets": adapt {q}, {k}, {v}, {o}, {q,v}, {q,k,v,o} at one budget of trainable
parameters (a single type at ``budget_rank``, n types at ``budget_rank/n`` each; every
attention projection of the reference Transformer is d_model × d_model, so the budgets are
equal exactly). Table "ranks": {q,v} at several ranks. Each configuration is trained with
``loraexport.stages.train.train`` once per seed; quality is held-out exact match (greedy decoding)
and held-out token cross-entropy. ``lora_alpha`` is fixed (the paper fixes α and lets the
scaling α/r follow r).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraexport.artifact.output import plan_output, write_output
from loraexport.core.io import write_json
from loraexport.core.progress import Progress
from loraexport.errors import InvalidInputError
from loraexport.lora.adapter import Adapter
from loraexport.models.reference import batch_encode, check_pairs, load_model
from loraexport.models.registry import load_base
from loraexport.models.transformer import Transformer
from loraexport.stages.train import train
from loraexport.training.data import read_pairs, split, write_pairs

SCHEMA = 1
TARGET_SETS: tuple[tuple[str, ...], ...] = (("q",), ("k",), ("v",), ("o",), ("q", "v"), ("q", "k", "v", "o"))
RANK_TARGETS = ("q", "v")
RANKS = (1, 2, 4, 8, 64)
ALPHA = 16.0  # loraexport train's default; fixed across ranks as in the paper
EVAL_FRACTION = 0.1  # held out of --data when no --eval-data is given
EVAL_BATCH = 256


@dataclass(frozen=True)
class SweepConfig:
    targets: tuple[str, ...]
    rank: int

    @property
    def name(self) -> str:
        return f"{''.join(self.targets)}-r{self.rank}"

    @property
    def label(self) -> str:
        return "{" + ",".join(self.targets) + "}"


def plan(
    budget_rank: int = 8,
    ranks: Sequence[int] = RANKS,
    target_sets: Sequence[Sequence[str]] = TARGET_SETS,
) -> dict[str, list[SweepConfig]]:
    """The two tables' configurations; a configuration in both is trained once."""
    sizes = sorted({len(t) for t in target_sets})
    if any(budget_rank % n for n in sizes):
        counts = ", ".join(map(str, sizes))
        raise InvalidInputError(
            f"budget rank {budget_rank} cannot be split equally over {counts} target types "
            f"(use a multiple of {math.lcm(*sizes)})"
        )
    return {
        "targets": [SweepConfig(tuple(t), budget_rank // len(t)) for t in target_sets],
        "ranks": [SweepConfig(RANK_TARGETS, r) for r in dict.fromkeys(ranks)],
    }


def sweep(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    eval_data: str | Path | None = None,
    steps: int = 100,
    seeds: int = 3,
    budget_rank: int = 8,
    ranks: Sequence[int] | None = None,
    target_sets: Sequence[Sequence[str]] = TARGET_SETS,
    lr: float = 3e-3,
    batch_size: int = 64,
    force: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Train every configuration of ``plan`` ``seeds`` times; write sweep.json, sweep.md, adapters/.

    Without ``eval_data``, 10% of ``data`` is held out once (seed 0) and both parts are kept
    in ``out/data/``, so every run sees the same split. ``target_sets`` replaces the first
    table's target sets (tests use one or two).

    Raises:
        InvalidInputError (and subclasses): a base that is not the reference Transformer,
            unreadable data, a budget rank that does not split, ``out`` existing.
    """
    out_plan = plan_output(
        out, force=force, inputs={"--base": base, "--data": data, "--eval-data": eval_data}
    )
    if not (1 <= seeds <= 100 and 1 <= steps <= 10**7):
        raise InvalidInputError(
            f"steps must be in [1, 10**7] and seeds in [1, 100], got steps={steps}, seeds={seeds}"
        )
    family, model = load_base(base)
    if not isinstance(model, Transformer):
        raise InvalidInputError(
            f"sweep supports the reference Transformer only; {base} is a {family.name} model"
        )
    if ranks is None:  # the paper's ranks, those the model's d_model × d_model projections can use
        ranks = [r for r in RANKS if r <= model.config.d_model]
    tables = plan(budget_rank, ranks, target_sets)
    widest = max(c.rank for cs in tables.values() for c in cs)
    if widest > model.config.d_model:  # every attention projection is d_model × d_model
        raise InvalidInputError(
            f"rank {widest} is larger than the {model.config.d_model}×{model.config.d_model} attention "
            f"projections of {base} can use (ΔW = B·A has rank at most {model.config.d_model})"
        )
    pairs = read_pairs(data)
    check_pairs(model.config, pairs, str(data))
    configs = list(dict.fromkeys(c for cs in tables.values() for c in cs))
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with write_output(out_plan) as tmp:
        train_file, eval_file = _split_files(tmp, data, eval_data, pairs, model)
        eval_pairs = read_pairs(eval_file)
        with Progress(len(configs) * seeds, "sweep", "runs", show_progress) as bar:
            for config in configs:
                for seed in range(seeds):
                    run = _train_one(
                        base, train_file, eval_file, eval_pairs, tmp, config, seed, steps, lr, batch_size
                    )
                    runs.append(run)
                    bar.update(1)
                    log(
                        f"{config.label} r={config.rank} seed {seed}: held-out exact match "
                        f"{run['eval_exact_match']:.1%}, loss {run['eval_loss']:.4f} ({run['seconds']:.1f} s)"
                    )
        result = {
            "schema": SCHEMA,
            "base": {"path": str(base), "parameters": sum(p.numel() for p in model.parameters())},
            "data": {
                "train": str(data),
                "eval": str(eval_data) if eval_data is not None else "held out of train (data/eval.jsonl)",
                "eval_examples": len(eval_pairs),
            },
            "settings": {
                "steps": steps,
                "seeds": seeds,
                "lr": lr,
                "batch_size": batch_size,
                "lora_alpha": ALPHA,
                "budget_rank": budget_rank,
            },
            "base_exact_match": runs[0]["eval_exact_match_before"],
            "configs": [_summary(c, [r for r in runs if r["config"] == c.name]) for c in configs],
            "tables": {name: [c.name for c in cs] for name, cs in tables.items()},
            "runs": runs,
            "seconds": time.perf_counter() - t0,
        }
        write_json(tmp / "sweep.json", result)
        (tmp / "sweep.md").write_text(to_markdown(result), encoding="utf-8")
    return result


def _split_files(
    tmp: Path, data: str | Path, eval_data: str | Path | None, pairs: list, model: Transformer
) -> tuple[Path, Path]:
    if eval_data is not None:
        check_pairs(model.config, read_pairs(eval_data), str(eval_data))
        return Path(data), Path(eval_data)
    train_pairs, held = split(pairs, EVAL_FRACTION, 0)
    (tmp / "data").mkdir()
    write_pairs(tmp / "data" / "train.jsonl", train_pairs)
    write_pairs(tmp / "data" / "eval.jsonl", held)
    return tmp / "data" / "train.jsonl", tmp / "data" / "eval.jsonl"


def _train_one(
    base: str | Path,
    train_file: Path,
    eval_file: Path,
    eval_pairs: list,
    tmp: Path,
    config: SweepConfig,
    seed: int,
    steps: int,
    lr: float,
    batch_size: int,
) -> dict[str, Any]:
    adapter_dir = tmp / "adapters" / f"{config.name}-seed{seed}"
    result = train(
        base,
        train_file,
        adapter_dir,
        eval_data=eval_file,
        rank=config.rank,
        alpha=ALPHA,
        targets=list(config.targets),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        show_progress=False,
    )
    return {
        "config": config.name,
        "targets": list(config.targets),
        "rank": config.rank,
        "seed": seed,
        "adapter": str(adapter_dir.relative_to(tmp)),
        "trainable_parameters": result.trainable_parameters,
        "final_loss": result.final_loss,
        "eval_exact_match_before": result.eval_before,
        "eval_exact_match": result.eval_after,
        "eval_loss": held_out_loss(base, adapter_dir, eval_pairs),
        "seconds": result.seconds,
    }


@torch.no_grad()
def held_out_loss(base: str | Path, adapter_dir: Path, pairs: list) -> float:
    """Mean token cross-entropy (teacher forcing) of base + adapter, unmerged, on ``pairs``."""
    model = Adapter.load(adapter_dir).apply(load_model(base)).eval()
    total, tokens = 0.0, 0
    for i in range(0, len(pairs), EVAL_BATCH):
        batch = batch_encode(model.config, pairs[i : i + EVAL_BATCH])
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("decoder_input_ids"))
        labels = batch["labels"]
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).double(),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        tokens += int((labels != -100).sum())
    return total / tokens


def _summary(config: SweepConfig, runs: list[dict]) -> dict[str, Any]:
    em = [r["eval_exact_match"] for r in runs]
    loss = [r["eval_loss"] for r in runs]
    return {
        "config": config.name,
        "targets": list(config.targets),
        "rank": config.rank,
        "trainable_parameters": runs[0]["trainable_parameters"],
        "exact_match_mean": sum(em) / len(em),
        "exact_match_min": min(em),
        "exact_match_max": max(em),
        "eval_loss_mean": sum(loss) / len(loss),
        "eval_loss_min": min(loss),
        "eval_loss_max": max(loss),
    }


def _pct_range(c: dict) -> str:
    s = f"{c['exact_match_mean']:.1%}"
    if c["exact_match_min"] != c["exact_match_max"]:
        s += f" ({c['exact_match_min']:.1%}–{c['exact_match_max']:.1%})"
    return s


def _loss_range(c: dict) -> str:
    s = f"{c['eval_loss_mean']:.4f}"
    if c["eval_loss_min"] != c["eval_loss_max"]:
        s += f" ({c['eval_loss_min']:.4f}–{c['eval_loss_max']:.4f})"
    return s


def to_markdown(result: dict[str, Any], title: bool = True) -> str:
    """Both tables; ``title=False`` leaves out the heading and settings (for the terminal)."""
    st = result["settings"]
    by_name = {c["config"]: c for c in result["configs"]}
    spread = f"mean over {st['seeds']} seeds (min–max)" if st["seeds"] > 1 else "one seed"
    lines = []
    if title:
        lines += [
            "# LoRA sweep: which weights to adapt, which rank",
            "",
            f"- base: `{result['base']['path']}` ({result['base']['parameters']:,} parameters); "
            f"held-out exact match without an adapter: {result['base_exact_match']:.1%}",
            f"- data: `{result['data']['train']}`; held out: {result['data']['eval']} "
            f"({result['data']['eval_examples']} examples)",
            f"- {st['steps']} steps, lr {st['lr']}, batch {st['batch_size']}, lora_alpha {st['lora_alpha']} "
            f"(scaling α/r), {st['seeds']} seed(s); {result['seconds']:.0f} s in all",
            "",
        ]
    head = ["trainable parameters", f"held-out exact match, {spread}", "held-out loss"]
    budget = by_name[result["tables"]["targets"][0]]["trainable_parameters"]
    lines += [
        f"Targets at one budget ({budget:,} trainable parameters; the paper's table 5):",
        "",
        "| targets | r | " + " | ".join(head) + " |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in result["tables"]["targets"]:
        c = by_name[name]
        lines.append(
            "| {" + ",".join(c["targets"]) + f"}} | {c['rank']} | {c['trainable_parameters']:,} | "
            f"{_pct_range(c)} | {_loss_range(c)} |"
        )
    lines += [
        "",
        "Ranks on {" + ",".join(RANK_TARGETS) + "} (the paper's table 6):",
        "",
        "| r | " + " | ".join(head) + " |",
        "|---:|---:|---:|---:|",
    ]
    for name in result["tables"]["ranks"]:
        c = by_name[name]
        lines.append(f"| {c['rank']} | {c['trainable_parameters']:,} | {_pct_range(c)} | {_loss_range(c)} |")
    return "\n".join(lines) + "\n"
