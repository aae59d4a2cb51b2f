"""The train stage: a LoRA adapter trained on a base and written in PEFT's format, with
``training.json`` (hyper-parameters, losses, held-out exact match) beside it."""

from __future__ import annotations

import math
from pathlib import Path

from loraexport.data import read_pairs, split
from loraexport.errors import InvalidInputError
from loraexport.io import write_json
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import check_ranks
from loraexport.models.reference import check_pairs
from loraexport.models.registry import load_base
from loraexport.models.transformer import Transformer
from loraexport.output import plan_output, write_output
from loraexport.training import TrainResult, train_lora


def train(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    eval_data: str | Path | None = None,
    eval_fraction: float = 0.1,
    rank: int = 8,
    alpha: float = 16.0,
    targets: list[str] | str = ("q", "v"),
    dropout: float = 0.0,
    use_rslora: bool = False,
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    force: bool = False,
    show_progress: bool = True,
    log=None,
) -> TrainResult:
    """Train a LoRA adapter on ``base`` and write it to ``out`` in PEFT's layout.

    ``out`` also gets ``training.json`` (hyper-parameters, losses, held-out accuracy).
    """
    _check_numbers(steps=steps, lr=lr, batch_size=batch_size, seed=seed, eval_fraction=eval_fraction)
    plan = plan_output(out, force=force, inputs={"--base": base, "--data": data, "--eval-data": eval_data})
    for stale in plan.removed_stale:
        (log or (lambda _: None))(f"removed {stale.name}, left by a run that was killed")
    family, model = load_base(base)
    if not isinstance(model, Transformer):
        raise InvalidInputError(
            f"loraexport train supports the reference Transformer only; {base} is a {family.name} model "
            "(train its adapter with PEFT, then use merge-and-export)"
        )
    pairs = read_pairs(data)
    check_pairs(model.config, pairs, str(data))  # before any training: errors name the example
    if eval_data is not None:
        train_pairs, eval_pairs = pairs, read_pairs(eval_data)
        check_pairs(model.config, eval_pairs, str(eval_data))
    else:
        train_pairs, eval_pairs = split(pairs, eval_fraction, seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        lora_dropout=dropout,
        use_rslora=use_rslora,
        base_model_name_or_path=str(base),
    )
    check_ranks(model, config)  # before any allocation: r is bounded by the layers' dimensions
    adapter, result = train_lora(
        model,
        config,
        train_pairs,
        eval_pairs,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        show_progress=show_progress,
    )
    with write_output(plan) as tmp:
        adapter.save(tmp)
        write_json(
            tmp / "training.json",
            {
                "steps": steps,
                "lr": lr,
                "batch_size": batch_size,
                "seed": seed,
                "train_examples": len(train_pairs),
                "eval_examples": len(eval_pairs),
                "seconds": result.seconds,
                "final_loss": result.final_loss,
                "trainable_parameters": result.trainable_parameters,
                "base_parameters": result.base_parameters,
                "eval_exact_match_before": result.eval_before,
                "eval_exact_match_after": result.eval_after,
                "losses": result.losses[:: max(1, len(result.losses) // 100)],
            },
        )
    return result


def _check_numbers(*, steps: int, lr: float, batch_size: int, seed: int, eval_fraction: float) -> None:
    """The CLI's types refuse these first (exit 2); callers of the Python API get exit 3's error."""
    ok = {
        "steps": isinstance(steps, int) and 1 <= steps <= 10**7,
        "lr": isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 10,
        "batch_size": isinstance(batch_size, int) and 1 <= batch_size <= 65536,
        "seed": isinstance(seed, int) and 0 <= seed <= 2**63 - 1,
        "eval_fraction": isinstance(eval_fraction, (int, float)) and 0 < eval_fraction < 1,
    }
    bad = [k for k, good in ok.items() if not good]
    if bad:
        values = {
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "eval_fraction": eval_fraction,
        }
        raise InvalidInputError(f"{bad[0]} {values[bad[0]]!r} cannot be used for training")
