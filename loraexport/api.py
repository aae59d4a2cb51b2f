"""The Python API over directories: what each CLI command calls."""

from __future__ import annotations

from pathlib import Path

from loraexport.data import read_pairs, split
from loraexport.io import atomic_output_dir, check_output, write_json
from loraexport.lora.config import LoraConfig
from loraexport.models.base import load_base
from loraexport.train import TrainResult, train_lora


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
) -> TrainResult:
    """Train a LoRA adapter on ``base`` and write it to ``out`` in PEFT's layout.

    ``out`` also gets ``training.json`` (hyper-parameters, losses, held-out accuracy).
    """
    check_output(out, force)
    _, model = load_base(base)
    pairs = read_pairs(data)
    if eval_data is not None:
        train_pairs, eval_pairs = pairs, read_pairs(eval_data)
    else:
        train_pairs, eval_pairs = split(pairs, eval_fraction, seed)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str) else targets,
        lora_dropout=dropout, use_rslora=use_rslora, base_model_name_or_path=str(base),
    )
    adapter, result = train_lora(model, config, train_pairs, eval_pairs, steps=steps, lr=lr,
                                 batch_size=batch_size, seed=seed, show_progress=show_progress)
    with atomic_output_dir(out, force) as tmp:
        adapter.save(tmp)
        write_json(tmp / "training.json", {
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_examples": len(train_pairs), "eval_examples": len(eval_pairs),
            "seconds": result.seconds, "final_loss": result.final_loss,
            "trainable_parameters": result.trainable_parameters,
            "base_parameters": result.base_parameters,
            "eval_exact_match_before": result.eval_before, "eval_exact_match_after": result.eval_after,
            "losses": result.losses[:: max(1, len(result.losses) // 100)],
        })
    return result
