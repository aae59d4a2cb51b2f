"""The Python API over directories: what each CLI command calls."""

from __future__ import annotations

from pathlib import Path

from loraexport.data import read_pairs, split
from loraexport.errors import InvalidInputError
from loraexport.io import atomic_output_dir, check_output, write_json
from loraexport.lora.config import LoraConfig
from loraexport.models.base import load_base
from loraexport.models.reference import check_pairs
from loraexport.models.transformer import Transformer
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
    with atomic_output_dir(out, force) as tmp:
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


def inspect_path(path: str | Path) -> dict:
    """Say what ``path`` is — a PEFT adapter, a model directory, or a loraexport output — and its facts."""
    from loraexport.errors import InvalidInputError, ModelFormatError
    from loraexport.io import read_json, require_dir
    from loraexport.lora.adapter import CONFIG_NAME, Adapter

    d = require_dir(path, "path")
    meta = read_json(d / "loraexport.json", ModelFormatError) if (d / "loraexport.json").is_file() else {}
    if isinstance(meta, dict) and "graphs" in meta:  # an export; other outputs only list their files
        info = {
            "kind": "loraexport output",
            "path": str(d),
            "model": meta.get("model", {}).get("kind"),
            "family": meta.get("model", {}).get("family"),
            "mode": meta.get("mode"),
            "opset": meta.get("opset"),
            "files": sorted(meta.get("files", {})),
            "graphs": meta.get("graphs", {}),
        }
        if (d / "report.json").is_file():
            report = read_json(d / "report.json", ModelFormatError)
            info["parity_passed"] = report.get("passed")
        return info
    if (d / CONFIG_NAME).is_file():
        adapter = Adapter.load(d)
        c = adapter.config
        return {
            "kind": "PEFT LoRA adapter",
            "path": str(d),
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "use_rslora": c.use_rslora,
            "target_modules": c.target_modules,
            "modules": len(adapter.weights),
            "parameters": adapter.num_parameters,
            "base_model_name_or_path": c.base_model_name_or_path,
        }
    if (d / "config.json").is_file():
        family, model = load_base(d)
        from loraexport.lora.inject import linear_names

        names = linear_names(model)
        return {
            "kind": "model",
            "path": str(d),
            "family": family.name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "linear_layers": len(names),
            "linear_names": sorted({n.rsplit(".", 1)[-1] for n in names}),
        }
    raise InvalidInputError(
        f"{d}: neither an adapter (adapter_config.json), a model (config.json) nor a loraexport output"
    )
