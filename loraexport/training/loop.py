"""The training loop: LoRA adaptation (and full training, used to make the sample base)."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loraexport.core.progress import Progress
from loraexport.errors import TrainingDivergedError
from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject
from loraexport.models.reference import EOS, Vocab, batch_encode, greedy_generate, prompt_ids
from loraexport.models.transformer import Transformer
from loraexport.training.data import Pair


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    trainable_parameters: int
    base_parameters: int
    eval_before: float | None = None
    eval_after: float | None = None
    losses: list[float] = field(default_factory=list)
    # what eval_before/after measure: "exact_match" (greedy outputs), "accuracy" (classifiers),
    # None (nothing but the loss: decoders trained on plain text)
    metric: str | None = "exact_match"
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    tokens: int = 0  # tokens the training steps read (padding excluded)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / self.base_parameters

    def evals(self) -> dict[str, float | None]:
        """The held-out numbers by name: ``eval_<metric>_before``/``_after``, and
        ``eval_loss_before``/``_after`` where the loss was measured."""
        out = {}
        if self.metric is not None:
            out |= {
                f"eval_{self.metric}_before": self.eval_before,
                f"eval_{self.metric}_after": self.eval_after,
            }
        if self.eval_loss_before is not None:
            out |= {"eval_loss_before": self.eval_loss_before, "eval_loss_after": self.eval_loss_after}
        return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _loss(model: Transformer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(batch["input_ids"], batch["attention_mask"], batch.get("decoder_input_ids"))
    labels = batch["labels"]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return loss, int((labels != -100).sum())


def warmup_steps(steps: int, warmup: float) -> int:
    """Steps of linear warm-up: ``warmup`` below 1 is a fraction of ``steps`` (rounded down),
    else a number of steps; at least 1 (a one-step warm-up is none: the first step is at full)."""
    if warmup < 1:
        return max(1, math.floor(steps * warmup + 1e-9))  # 1e-9: 0.05·steps is k, not k - 1e-16
    return int(warmup)


def scheduler(opt: torch.optim.Optimizer, steps: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warm`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )


def fit(
    model: Transformer,
    params: Iterable[nn.Parameter],
    pairs: list[Pair],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float = 0.05,
    desc: str = "train",
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up (``warmup_steps``: 5% by default) and cosine decay; batches
    sampled with ``seed``."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = scheduler(opt, steps, warmup_steps(steps, warmup))
    rng = random.Random(seed)
    losses: list[float] = []
    model.train()
    tokens, t0 = 0, time.perf_counter()
    with Progress(steps, desc, "steps", show_progress) as bar:
        for step in range(steps):
            batch = batch_encode(model.config, rng.sample(pairs, min(batch_size, len(pairs))))
            loss, n_tok = _loss(model, batch)
            if not math.isfinite(loss.item()):  # a loss that is NaN once stays NaN: stop, write nothing
                raise TrainingDivergedError(
                    f"training diverged at step {step + 1} of {steps}: the loss is {loss.item()} "
                    f"(learning rate {lr:g}; try a lower --lr); nothing was written"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            tokens += n_tok
            bar.update(1, loss=losses[-1], tok_s=int(tokens / (time.perf_counter() - t0)))
            if on_step:
                on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def exact_match(model: Transformer, pairs: list[Pair], batch_size: int = 256) -> float:
    """Fraction of pairs whose greedy output equals the target exactly."""
    model.eval()
    vocab = Vocab(model.config.vocab)
    groups: dict[int, list[Pair]] = {}
    for p in pairs:  # equal-length prompts per batch (decoder-only positions; harmless otherwise)
        groups.setdefault(len(p[0]), []).append(p)
    correct = 0
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            inputs = prompt_ids(model.config, [s for s, _ in chunk])
            max_new = max(len(t) for _, t in chunk) + 1  # target + <eos>
            out = greedy_generate(model, inputs, max_new)
            for row, (_, target) in zip(out.tolist(), chunk, strict=True):
                correct += vocab.decode(row) == target and EOS in row
    return correct / len(pairs)


def check_finite(params: list[nn.Parameter]) -> None:
    """The trained parameters are finite, else ``TrainingDivergedError`` (nothing is written)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainingDivergedError(
            "training diverged: the adapter's weights are not finite; nothing was written"
        )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def train_lora(
    model: Transformer,
    config: LoraConfig,
    train_pairs: list[Pair],
    eval_pairs: list[Pair] | None,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    warmup: float = 0.05,
    show_progress: bool = True,
) -> tuple[Adapter, TrainResult]:
    """Inject LoRA into ``model`` (in place), train A and B only, return the adapter.

    The base weights are frozen and stay bit-identical; ``eval_before``/``eval_after`` are
    exact-match accuracies on ``eval_pairs`` with the adapter off and on.
    """
    seed_everything(seed)
    base_params = count_parameters(model)
    before = exact_match(model, eval_pairs) if eval_pairs else None
    inject(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    losses = fit(
        model,
        trainable,
        train_pairs,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        warmup=warmup,
        desc="train LoRA",
        show_progress=show_progress,
    )
    seconds = time.perf_counter() - t0
    after = exact_match(model, eval_pairs) if eval_pairs else None
    check_finite(trainable)
    n_trainable = sum(p.numel() for p in trainable)  # A and B (and DoRA's magnitudes)
    result = TrainResult(steps, seconds, losses[-1], n_trainable, base_params, before, after, losses)
    return Adapter.from_model(model, config), result
