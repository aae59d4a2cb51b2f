"""Training a LoRA adapter on a Hugging Face base: what is trained, batches, the loop, held-out
evaluation.

Decoders (``hf-causal``) learn the next token where ``data_hf`` puts a target (a completion and
its EOS, or all of a text); sequence classifiers (``hf-encoder`` with a head) learn the label,
their head (``classifier``) trained in full beside the LoRA branches and saved as PEFT's
``modules_to_save``. The optimisation is ``training.fit``'s: AdamW, linear warm-up then cosine
decay, gradients clipped to norm 1; with gradient accumulation a step's loss is the mean over
every target of its micro-batches, so ``--grad-accum k --batch-size b`` trains as
``--batch-size k·b`` does (up to float rounding), in the memory of ``b``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraexport.core.progress import Progress
from loraexport.core.untrusted import short_repr
from loraexport.errors import AdapterMismatchError, InvalidInputError, TrainingDivergedError
from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import check_ranks, inject, is_transposed, target_names
from loraexport.models.base import ModelFamily
from loraexport.training.data_hf import CAUSAL, CLASSIFY, Example
from loraexport.training.loop import (
    TrainResult,
    check_finite,
    count_parameters,
    scheduler,
    seed_everything,
    warmup_steps,
)

HEAD = "classifier"  # BERT's and RoBERTa's sequence-classification head (PEFT's modules_to_save)
IGNORE = -100  # the label of a position without loss (cross_entropy's ignore_index)
TASK_TYPES = {CAUSAL: "CAUSAL_LM", CLASSIFY: "SEQ_CLS"}  # PEFT's task_type


@dataclass(frozen=True)
class Task:
    """What a base is trained for, and the token ids that takes."""

    kind: str  # CAUSAL or CLASSIFY
    pad_id: int  # fills batches (masked out: any id would do)
    eos_id: int | None = None  # decoders: ends every example
    num_labels: int | None = None  # classifiers
    generate: Callable | None = None  # decoders: the family's greedy decoding (exact match)

    @property
    def head(self) -> str | None:
        return HEAD if self.kind == CLASSIFY else None


@dataclass(frozen=True)
class Schedule:
    """How long and how fast: optimizer steps of ``grad_accum`` micro-batches of ``batch_size``."""

    steps: int
    lr: float
    batch_size: int
    grad_accum: int = 1
    warmup: float = 0.05  # a fraction of steps (below 1) or a number of steps
    seed: int = 0


def task_of(family: ModelFamily, model: nn.Module, tokenizer, base: Path) -> Task:
    """The task of a Hugging Face base: a decoder predicts tokens, an encoder with a
    sequence-classification head a label; an encoder without one is refused."""
    if tokenizer is None:
        raise InvalidInputError(
            f"{base}: has no tokenizer (tokenizer_config.json); training needs one to read the data"
        )
    meta = family.runtime_meta(model)
    special = meta.get("special_tokens", {})
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else special.get("eos")
    pad = next((t for t in (tokenizer.pad_token_id, special.get("pad"), eos) if t is not None), 0)
    if meta["kind"] == "causal":
        if eos is None:
            raise InvalidInputError(
                f"{base}: neither the tokenizer nor config.json names an end-of-sequence token, "
                "which training appends to every example"
            )
        return Task(CAUSAL, pad, eos_id=eos, generate=family.generate)
    if meta.get("output") == "logits" and isinstance(getattr(model, HEAD, None), nn.Module):
        labels, problem = int(model.config.num_labels), getattr(model.config, "problem_type", None)
        if labels < 2 or problem not in (None, "single_label_classification"):
            raise InvalidInputError(
                f"{base / 'config.json'}: a head of {labels} label(s), problem_type {short_repr(problem)}: "
                "loraexport trains single-label classifiers (num_labels of 2 or more), not regression "
                "or multi-label heads"
            )
        return Task(CLASSIFY, pad, num_labels=labels)
    archs = short_repr(getattr(model.config, "architectures", None))
    raise InvalidInputError(
        f"{base / 'config.json'}: an encoder without a sequence-classification head (architectures "
        f"{archs}); loraexport trains encoders as classifiers: give a base whose config declares "
        "a *ForSequenceClassification architecture with num_labels"
    )


def lora_config(model: nn.Module, task: Task, **options) -> LoraConfig:
    """PEFT's config for ``task`` (``task_type``, a classifier's head in ``modules_to_save``),
    checked against ``model`` before any allocation: targets that match, ranks the layers can
    hold, no target inside the head, and ``fan_in_fan_out`` as PEFT sets it (GPT-2's Conv1D)."""
    config = LoraConfig(
        **options,
        task_type=TASK_TYPES[task.kind],
        modules_to_save=[task.head] if task.head else None,
    )
    names = target_names(model, config)
    inside = [n for n in names if task.head and (n == task.head or n.startswith(task.head + "."))]
    if inside:
        raise AdapterMismatchError(
            f"target {inside[0]!r} is inside the classification head {task.head!r}, which is trained "
            "in full (modules_to_save); leave it out of the targets"
        )
    transposed = {is_transposed(model.get_submodule(n)) for n in names}
    if len(transposed) > 1:
        raise AdapterMismatchError(
            "the targets match both nn.Linear and GPT-2's Conv1D layers, which one adapter cannot hold "
            f"(PEFT's fan_in_fan_out is one flag): {', '.join(names[:4])}..."
        )
    config.fan_in_fan_out = transposed.pop()
    check_ranks(model, config)
    return config


# ---- batches and the loss -----------------------------------------------------------------------
def collate(rows: list[Example], task: Task) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` (B, T) and ``labels``: (B, T) token
    targets, ``IGNORE`` where there is no loss (prompt, first token, padding), for decoders;
    (B,) classes for classifiers."""
    B, T = len(rows), max(len(r.ids) for r in rows)
    ids = torch.full((B, T), task.pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.ids)] = 1
    if task.kind == CLASSIFY:
        labels = torch.tensor([r.label for r in rows], dtype=torch.long)  # (B,)
    else:
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):  # the prompt (and a text's first token) predicts, is not predicted
            start = max(r.prompt, 1)
            labels[i, start : len(r.ids)] = ids[i, start : len(r.ids)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _targets(batch: dict[str, torch.Tensor], task: Task) -> int:
    """What the loss averages over: predicted tokens, or texts."""
    return int((batch["labels"] != IGNORE).sum()) if task.kind == CAUSAL else len(batch["labels"])


def _logits(model: nn.Module, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    extra = {"use_cache": False} if task.kind == CAUSAL else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits


def _loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: Task) -> torch.Tensor:
    """Cross-entropy summed over the batch's targets; a decoder's position t predicts token t+1."""
    labels = batch["labels"]
    if task.kind == CAUSAL:  # shift the labels, not the logits: (B, T, V) is the large one
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T): the token after each position
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B·T, V) or (B, labels)
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def _batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Epochs of the examples, each in a new order drawn with ``seed``."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    examples: list[Example],
    task: Task,
    schedule: Schedule,
    show_progress: bool = True,
) -> tuple[list[float], int]:
    """(loss per step, tokens read): ``schedule.steps`` AdamW steps of ``grad_accum``
    micro-batches each."""
    s = schedule
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = scheduler(opt, s.steps, warmup_steps(s.steps, s.warmup))
    batches = _batches(examples, s.batch_size, s.seed)
    losses: list[float] = []
    tokens, t0 = 0, time.perf_counter()
    model.train()
    with Progress(s.steps, "train LoRA", "steps", show_progress) as bar:
        for step in range(s.steps):
            micro = [collate(next(batches), task) for _ in range(s.grad_accum)]
            n = sum(_targets(b, task) for b in micro)
            total = 0.0
            for b in micro:
                loss = _loss_sum(_logits(model, b, task), b, task)
                (loss / n).backward()
                total += loss.item()
            if not math.isfinite(total):  # a loss that is NaN once stays NaN: stop, write nothing
                raise TrainingDivergedError(
                    f"training diverged at step {step + 1} of {s.steps}: the loss is {total / n} "
                    f"(learning rate {s.lr:g}; try a lower --lr); nothing was written"
                )
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total / n)
            tokens += sum(int(b["attention_mask"].sum()) for b in micro)
            bar.update(1, loss=losses[-1], tok_s=int(tokens / (time.perf_counter() - t0)))
    model.eval()
    return losses, tokens


# ---- held-out evaluation ------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[Example], task: Task, metric: str | None, batch_size: int
) -> tuple[float, float | None]:
    """(mean loss per target, ``metric``): ``accuracy`` of a classifier's argmax, ``exact_match``
    of a decoder's greedy completions, or None."""
    model.eval()
    loss, count, correct = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], task)
        logits = _logits(model, batch, task)
        loss += _loss_sum(logits, batch, task).item()
        count += _targets(batch, task)
        if task.kind == CLASSIFY:
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    value = None
    if metric == "accuracy":
        value = correct / len(examples)
    elif metric == "exact_match":
        value = exact_match(model, examples, task, batch_size)
    return loss / count, value


@torch.no_grad()
def exact_match(model: nn.Module, examples: list[Example], task: Task, batch_size: int) -> float:
    """Share of examples whose greedy tokens after the prompt are the completion's tokens and
    EOS, exactly (prompts batched by length: nothing is padded)."""
    groups: dict[int, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.prompt, []).append(e)
    correct = 0
    for length, group in sorted(groups.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            ids = torch.tensor([e.ids[:length] for e in chunk])  # (B, P)
            wanted = [list(e.ids[length:]) for e in chunk]
            out = task.generate(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, max(map(len, wanted))
            )
            correct += sum(row[: len(w)] == w for row, w in zip(out.tolist(), wanted, strict=True))
    return correct / len(examples)


# ---- all of it ----------------------------------------------------------------------------------
def train_hf(
    model: nn.Module,
    config: LoraConfig,
    task: Task,
    train: list[Example],
    held_out: list[Example],
    metric: str | None,
    schedule: Schedule,
    show_progress: bool = True,
) -> tuple[Adapter, TrainResult]:
    """Inject LoRA into ``model`` (in place), train it (and a classifier's head), return the
    adapter. The held-out loss and ``metric`` are measured before (the base) and after."""
    base_params = count_parameters(model)
    bs = schedule.batch_size
    loss_before, before = evaluate(model, held_out, task, metric, bs) if held_out else (None, None)
    seed_everything(schedule.seed)
    inject(model, config)
    head = model.get_submodule(task.head) if task.head else None
    for p in head.parameters() if head is not None else ():
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    losses, tokens = fit(model, trainable, train, task, schedule, show_progress)
    seconds = time.perf_counter() - t0
    loss_after, after = evaluate(model, held_out, task, metric, bs) if held_out else (None, None)
    check_finite(trainable)
    adapter = Adapter.from_model(model, config)
    if head is not None:  # PEFT's modules_to_save: the head's tensors, by parameter name
        adapter.replacements = {f"{task.head}.{k}": t.detach().clone() for k, t in head.state_dict().items()}
    n_trainable = sum(p.numel() for p in trainable)
    result = TrainResult(
        schedule.steps,
        seconds,
        losses[-1],
        n_trainable,
        base_params,
        before,
        after,
        losses,
        metric=metric,
        eval_loss_before=loss_before,
        eval_loss_after=loss_after,
        tokens=tokens,
    )
    return adapter, result
