"""The train stage: a LoRA adapter trained on a base and written in PEFT's format, with
``training.json`` (hyper-parameters, losses, held-out numbers before and after) beside it.

The reference Transformer trains on ``{"source", "target"}`` pairs (``data``, ``training``);
Hugging Face decoders and sequence classifiers on their JSON Lines formats (``data_hf``,
``training_hf``). Every example is read and checked before any training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraexport.artifact.output import plan_output, write_output
from loraexport.core import threads as torch_threads
from loraexport.core.io import write_json
from loraexport.errors import InvalidInputError, UsageError
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import check_ranks
from loraexport.models.hf.common import max_positions, text_config
from loraexport.models.reference import check_pairs
from loraexport.models.registry import ModelDir, load_model_dir
from loraexport.models.transformer import Transformer
from loraexport.training import data_hf
from loraexport.training.data import read_pairs, split
from loraexport.training.hf import HEAD, Schedule, lora_config, task_of, train_hf
from loraexport.training.loop import TrainResult, train_lora, warmup_steps
from loraexport.training.options import TrainOptions

# Defaults that differ by base: the reference Transformer is tiny and trains from a high rate
# on large batches; for Hugging Face bases, the rate of PEFT's and QLoRA's examples (2e-4).
DEFAULTS = {"reference": {"lr": 3e-3, "batch_size": 64}, "hf": {"lr": 2e-4, "batch_size": 8}}
DEFAULT_MAX_LENGTH = 256


def _check_held_out(data, eval_data) -> None:
    """--eval-data is held out: never the --data file itself (the same file by any path)."""
    if eval_data is None:
        return
    try:
        same = Path(data).resolve() == Path(eval_data).resolve() or os.path.samefile(data, eval_data)
    except OSError:  # a missing file is reported where it is read, in order
        same = False
    if same:
        raise UsageError(
            f"--eval-data {eval_data} is the --data file: the held-out set must not be the training set"
        )


def train(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    force: bool = False,
    show_progress: bool = True,
    log=None,
    **option_fields: Any,
) -> TrainResult:
    """Train a LoRA adapter on ``base`` and write it to ``out`` in PEFT's layout.

    ``options`` (or its fields as keywords, ``rank=4, steps=20``; not both): how to train,
    checked before any work (``TrainOptions``). ``out`` also gets ``training.json``.
    """
    opts = _options(options, option_fields)
    inputs = {"--base": base, "--data": data, "--eval-data": opts.eval_data}
    _check_held_out(data, opts.eval_data)
    plan = plan_output(out, force=force, inputs=inputs)
    for stale in plan.removed_stale:
        (log or (lambda _: None))(f"removed {stale.name}, left by a run that was killed")
    loaded = load_model_dir(base, supplied=(HEAD,))  # a classifier's head may be new: it is trained
    kind = "reference" if isinstance(loaded.model, Transformer) else "hf"
    torch_threads.use(sum(p.numel() for p in loaded.model.parameters()))  # said by verify, not here
    lr = DEFAULTS[kind]["lr"] if opts.lr is None else opts.lr
    batch_size = DEFAULTS[kind]["batch_size"] if opts.batch_size is None else opts.batch_size
    lora = dict(
        r=opts.rank,
        lora_alpha=opts.alpha,
        target_modules=_targets(opts.targets, loaded),
        lora_dropout=opts.dropout,
        use_rslora=opts.use_rslora,
        use_dora=opts.use_dora,
        base_model_name_or_path=str(base),
    )
    schedule = Schedule(opts.steps, lr, batch_size, opts.grad_accum, opts.warmup, opts.seed)
    if kind == "reference":
        given = dict(grad_accum=opts.grad_accum != 1, max_length=opts.max_length is not None, pack=opts.pack)
        _refuse_hf_options(base, **given)
        adapter, result, record = _train_reference(loaded, data, opts, lora, schedule, show_progress)
    else:
        adapter, result, record = _train_hf(loaded, data, opts, lora, schedule, show_progress)
    with write_output(plan) as tmp:
        adapter.save(tmp)
        write_json(tmp / "training.json", _training_json(record, lora, schedule, result))
    return result


def _options(options: TrainOptions | None, fields: dict[str, Any]) -> TrainOptions:
    """``options``, or one made of ``fields`` (checked now); the two together are refused, as is
    a keyword that names no field (a TypeError, as Python's for an unknown keyword)."""
    if options is None:
        unknown = [name for name in fields if name not in TrainOptions.__dataclass_fields__]
        if unknown:
            raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}")
        return TrainOptions(**fields)
    if not isinstance(options, TrainOptions):
        raise TypeError(f"train(): options must be a TrainOptions, not {type(options).__name__}")
    if fields:
        given = ", ".join(fields)
        raise TypeError(
            f"train() takes options or their fields as keywords, not both (got options and {given})"
        )
    return options


def _refuse_hf_options(base: str | Path, **given: bool) -> None:
    """The reference Transformer's training has no gradient accumulation, and its examples are
    bounded by its ``max_len``: those options are refused rather than ignored."""
    for name, was_given in given.items():
        if was_given:
            raise InvalidInputError(
                f"--{name.replace('_', '-')} applies to Hugging Face bases; "
                f"{base} is the reference Transformer"
            )


def _targets(targets: list[str] | str | None, loaded: ModelDir) -> list[str] | str:
    if targets is None:
        return list(loaded.family.default_targets(loaded.model))
    return list(targets) if not isinstance(targets, str) else targets


def _train_reference(
    loaded: ModelDir, data, opts: TrainOptions, lora: dict, schedule: Schedule, show_progress: bool
):
    model = loaded.model
    pairs = read_pairs(data)
    check_pairs(model.config, pairs, str(data))  # before any training: errors name the example
    if opts.eval_data is not None:
        train_pairs, eval_pairs = pairs, read_pairs(opts.eval_data)
        check_pairs(model.config, eval_pairs, str(opts.eval_data))
    else:
        train_pairs, eval_pairs = split(pairs, opts.eval_fraction, schedule.seed)
    config = LoraConfig(**lora)
    check_ranks(model, config)  # before any allocation: r is bounded by the layers' dimensions
    adapter, result = train_lora(
        model,
        config,
        train_pairs,
        eval_pairs,
        steps=schedule.steps,
        lr=schedule.lr,
        batch_size=schedule.batch_size,
        seed=schedule.seed,
        warmup=schedule.warmup,
        show_progress=show_progress,
    )
    return adapter, result, {"train_examples": len(train_pairs), "eval_examples": len(eval_pairs)}


def _train_hf(
    loaded: ModelDir, data, opts: TrainOptions, lora: dict, schedule: Schedule, show_progress: bool
):
    model, tokenizer = loaded.model, loaded.tokenizer
    eval_data, pack = opts.eval_data, opts.pack
    task = task_of(loaded.family, model, tokenizer, loaded.path)
    fmt, records = data_hf.read_records(data, task.kind, task.num_labels)
    held_records = None
    if eval_data is not None:
        eval_fmt, held_records = data_hf.read_records(eval_data, task.kind, task.num_labels)
        if eval_fmt != fmt:
            raise InvalidInputError(
                f"{eval_data}: its examples are {data_hf.SHAPES[eval_fmt]} but those of {data} are "
                f"{data_hf.SHAPES[fmt]}; evaluate on the format trained"
            )
    if pack and fmt != data_hf.TEXT:
        raise InvalidInputError(
            f"--pack joins {data_hf.SHAPES[data_hf.TEXT]} examples; "
            f"{data} holds {data_hf.SHAPES[fmt]} examples"
        )
    positions = max_positions(text_config(model))
    length = min(opts.max_length or DEFAULT_MAX_LENGTH, positions)
    limit = f"--max-length {length}" if length < positions else f"the model's {positions} positions"
    options = dict(max_length=length, limit=limit, eos=task.eos_id, pack=pack)
    train_rows = data_hf.tokenize(data, fmt, records, tokenizer, **options)  # every line checked
    if held_records is not None:
        held = data_hf.tokenize(eval_data, fmt, held_records, tokenizer, **options)
    else:
        train_rows, held = data_hf.split(records, train_rows, opts.eval_fraction, schedule.seed)
    n_train, n_held = len(train_rows), len(held)
    if pack:
        train_rows, held = data_hf.pack(train_rows, length), data_hf.pack(held, length)
    config = lora_config(model, task, **lora)
    metric = "accuracy" if task.head else "exact_match" if fmt == data_hf.PROMPT else None
    adapter, result = train_hf(model, config, task, train_rows, held, metric, schedule, show_progress)
    record = {
        "task": task.kind,
        "data_format": fmt,
        "max_length": length,
        "pack": pack,
        "train_examples": n_train,
        "eval_examples": n_held,
        "train_rows": len(train_rows),
    }
    return adapter, result, record


def _training_json(record: dict[str, Any], lora: dict, schedule: Schedule, result: TrainResult) -> dict:
    return {
        **record,
        "steps": schedule.steps,
        "lr": schedule.lr,
        "batch_size": schedule.batch_size,
        "grad_accum": schedule.grad_accum,
        "warmup_steps": warmup_steps(schedule.steps, schedule.warmup),
        "seed": schedule.seed,
        "rank": lora["r"],
        "alpha": lora["lora_alpha"],
        "targets": lora["target_modules"],
        "dropout": lora["lora_dropout"],
        "rslora": lora["use_rslora"],
        "dora": lora["use_dora"],
        "seconds": result.seconds,
        "tokens": result.tokens,
        "final_loss": result.final_loss,
        "trainable_parameters": result.trainable_parameters,
        "base_parameters": result.base_parameters,
        "trainable_fraction": result.trainable_fraction,
        **result.evals(),
        "losses": result.losses[:: max(1, len(result.losses) // 100)],
    }
