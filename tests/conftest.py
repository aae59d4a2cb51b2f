"""Shared fixtures: tiny reference Transformers, adapters with non-zero B, sample paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT must never try the network in tests
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread (also for CLI subprocesses): the tiny models here gain nothing from
# parallel matmuls, and OpenMP workers spin-waiting on shared cores slow tests down 50x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from artifacts import (  # noqa: E402, F401 (session-scoped artifacts: fixtures for every test)
    VOCAB,
    causal_adapter,
    causal_base,
    causal_onnx,
    seq2seq_adapter,
    seq2seq_base,
    seq2seq_onnx,
    tiny_config,
)
from torch import nn  # noqa: E402

from loraexport.models.transformer import Transformer, TransformerConfig  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
SAMPLE_BASE = SAMPLES / "base"
SORT_TRAIN = SAMPLES / "data" / "sort_train.jsonl"
SEED = 0


def tiny_model(seed: int = SEED, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def randomize_lora_b(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Fill every ``lora_B`` (ours or PEFT's) with random values: B is zero-initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """``make_model(seed=0, **config_overrides)``: a fresh tiny Transformer in eval mode."""
    return tiny_model


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    """A padded batch for a tiny encoder-decoder: source ids/mask and decoder ids."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(4, len(VOCAB), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in one row
    ids[1, 5:] = 0
    dec = torch.randint(4, len(VOCAB), (3, 5), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


@pytest.fixture
def randomize_b() -> Callable[..., None]:
    """``randomize_b(model, seed=1, std=0.5)``: see ``randomize_lora_b``."""
    return randomize_lora_b


@pytest.fixture
def make_config() -> Callable[..., TransformerConfig]:
    return tiny_config


@pytest.fixture
def sample_base() -> Path:
    """The committed pre-trained sample model (encoder-decoder, d_model 128, reverses digits)."""
    return SAMPLE_BASE


@pytest.fixture
def small_data(tmp_path) -> Path:
    """The first 64 lines of samples/data/sort_train.jsonl, as a temporary JSON Lines file."""
    lines = SORT_TRAIN.read_text(encoding="utf-8").splitlines()[:64]
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
