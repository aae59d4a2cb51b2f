"""Session-scoped artifacts for the pipeline tests: tiny model dirs, adapters, ONNX exports.

Exports cost seconds each (the dynamo exporter), so each is made once per test session and
shared; tests that change an artifact copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.inject import inject, lora_layers
from loraexport.models.reference import SPECIALS, save_model
from loraexport.models.transformer import Transformer, TransformerConfig
from loraexport.stages.export import export

VOCAB = SPECIALS + list("0123456789")
B_STD = 0.3  # LoRA B values: large enough that the adapter visibly changes every output


def make_base(directory: Path, seed: int = 0, **overrides) -> Path:
    kw = dict(
        vocab=list(VOCAB),
        d_model=16,
        n_heads=2,
        d_ff=32,
        n_encoder_layers=1,
        n_decoder_layers=2,
        max_len=32,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    save_model(Transformer(TransformerConfig(**kw)).eval(), directory)
    return directory


def make_adapter(base_dir: Path, directory: Path, seed: int = 1, **config) -> Path:
    """An adapter with non-zero B (B is zero-initialised: merging it would prove nothing)."""
    from loraexport.models.reference import load_model

    model = load_model(base_dir)
    cfg = LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]} | config))
    inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * B_STD)
    directory.mkdir(parents=True)
    Adapter.from_model(model, cfg).save(directory)
    return directory


@pytest.fixture(scope="session")
def seq2seq_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("s2s") / "base")


@pytest.fixture(scope="session")
def seq2seq_adapter(seq2seq_base, tmp_path_factory) -> Path:
    return make_adapter(seq2seq_base, tmp_path_factory.mktemp("s2s-adapter") / "adapter")


@pytest.fixture(scope="session")
def causal_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("causal") / "base", n_encoder_layers=0)


@pytest.fixture(scope="session")
def causal_adapter(causal_base, tmp_path_factory) -> Path:
    return make_adapter(causal_base, tmp_path_factory.mktemp("causal-adapter") / "adapter", seed=2)


@pytest.fixture(scope="session")
def seq2seq_onnx(seq2seq_base, seq2seq_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s2s-onnx") / "onnx"
    export(seq2seq_base, out, adapter=seq2seq_adapter)
    return out


@pytest.fixture(scope="session")
def causal_onnx(causal_base, causal_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("causal-onnx") / "onnx"
    export(causal_base, out, adapter=causal_adapter)
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
