"""Streaming merge: bit-identical to the in-memory merge, sharded checkpoints, several adapters,
bounded work on interruption or a full disk, and malformed safetensors refused."""

from __future__ import annotations

import errno
import json
import re
import struct

import pytest
import torch
from clihelp import one_line, refused, run
from safetensors.torch import load_file, save_file

from loraexport.errors import AdapterFormatError, AdapterMismatchError, ModelFormatError
from loraexport.lora.adapter import Adapter
from loraexport.lora.config import LoraConfig
from loraexport.lora.merge import merge_state_dict
from loraexport.lora.stream import INDEX, read_header, stream_merge

# Two adapters with weights against float64 (W0 + Σ w·s·B·A computed wide, then one cast to
# float32): the stored value is within half a float32 ulp, far inside the 1e-6 contract.
REL_TOL = 1e-6
SHAPES = {"layers.0.q": (24, 16), "layers.0.v": (8, 16), "layers.1.q": (24, 16), "layers.1.v": (8, 16)}


def _checkpoint(d, dtype=torch.float32, shards=2, seed=0):
    """A sharded safetensors checkpoint with an index, plus untargeted tensors of other dtypes."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{p}.weight": torch.randn(s, generator=g).to(dtype) for p, s in SHAPES.items()}
    tensors.update({f"{p}.bias": torch.randn(s[0], generator=g).to(dtype) for p, s in SHAPES.items()})
    tensors["embed.weight"] = torch.randn(10, 16, generator=g).to(dtype)
    tensors["position_ids"] = torch.arange(7)  # an int64 buffer: copied as bytes
    d.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text("{}")
    return tensors


def _adapter(targets, r, alpha, seed, d=None):
    g = torch.Generator().manual_seed(seed)
    w = {
        p: (torch.randn(r, SHAPES[p][1], generator=g), torch.randn(SHAPES[p][0], r, generator=g) * 0.3)
        for p in targets
    }
    # full module paths as targets: the adapter holds tensors for exactly what its config targets
    a = Adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(targets)), w)
    if d is not None:
        d.mkdir()
        a.save(d)
        a = Adapter.load(d)
    return a


def _read_all(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bit_identical_to_in_memory_merge(tmp_path, dtype):
    tensors = _checkpoint(tmp_path / "base", dtype)
    adapters = [_adapter(["layers.0.q", "layers.1.v"], 4, 8, 1)]
    (tmp_path / "out").mkdir()
    stats = stream_merge(tmp_path / "base", adapters, tmp_path / "out")
    want, mem_stats = merge_state_dict(tensors, adapters)
    got = _read_all(tmp_path / "out")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert (tmp_path / "out" / INDEX).exists() and (tmp_path / "out" / "config.json").exists()
    assert [m.module for m in stats.modules] == sorted(m.module for m in mem_stats.modules)
    assert not torch.equal(
        got["layers.0.q.weight"], tensors["layers.0.q.weight"]
    )  # the adapter did something
    if dtype != torch.float32:
        assert all(m.cast_max_abs_err > 0 for m in stats.modules)  # the half-precision cast, accounted


def test_two_adapters_with_weights_equal_float64(tmp_path):
    tensors = _checkpoint(tmp_path / "base")
    a1 = _adapter(["layers.0.q", "layers.0.v"], 4, 8, 1)
    a2 = _adapter(["layers.0.q", "layers.1.q"], 2, 4, 2)  # another rank and other targets
    w = [0.7, 0.3]
    (tmp_path / "out").mkdir()
    stream_merge(tmp_path / "base", [a1, a2], tmp_path / "out", w)
    got = _read_all(tmp_path / "out")
    for p in SHAPES:
        ref = tensors[f"{p}.weight"].double()
        for a, wi in zip((a1, a2), w, strict=True):
            if p in a.weights:
                A, B = a.weights[p]
                ref = ref + wi * a.config.scaling(p) * (B.double() @ A.double())
        err = float((got[f"{p}.weight"].double() - ref).abs().max() / ref.abs().max())
        assert err <= REL_TOL, (p, err)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (
            lambda a: a.weights.pop("layers.1.q"),
            AdapterFormatError,
            "tensor missing for targeted module 'layers.1.q'",
        ),
        (lambda a: a.config.target_modules.remove("layers.1.q"), AdapterMismatchError, "does not target"),
        (
            lambda a: a.replacements.update({"layers.0.q.bias": torch.ones(3)}),
            AdapterMismatchError,
            "shape (3,)",
        ),
    ],
    ids=["targeted-module-missing", "untargeted-module", "replacement-of-another-shape"],
)
def test_adapter_must_fit_the_checkpoint(tmp_path, edit, error, message):
    """What check_fits refuses for merge-and-export, the streaming merge refuses from tensor names."""
    _checkpoint(tmp_path / "base")
    adapter = _adapter(["layers.0.q", "layers.1.q"], 2, 4, 5)
    edit(adapter)
    (tmp_path / "out").mkdir()
    with pytest.raises(error, match=re.escape(message)):
        stream_merge(tmp_path / "base", [adapter], tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def _adapter_dir(tmp_path):
    return _adapter(["layers.0.q"], 2, 4, 3, tmp_path / "adapter").path


def test_sigint_leaves_nothing(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "base")
    adapter = _adapter_dir(tmp_path)
    from loraexport.core.progress import Progress

    def interrupt(self, n=1, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "update", interrupt)
    r = run(
        "merge", "--base", tmp_path / "base", "--adapter", adapter, "--out", tmp_path / "out", quiet=False
    )
    assert one_line(r, 130, "interrupted: ") == "interrupted: nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no output, no temp dir


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "base")
    adapter = _adapter_dir(tmp_path)
    from loraexport.lora import stream

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream.shutil, "copy2", full)
    r = run("merge", "--base", tmp_path / "base", "--adapter", adapter, "--out", tmp_path / "out")
    refused(r, 3, "no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda raw: struct.pack("<Q", 10**9) + raw[8:], "past the end"),
        (lambda raw: raw[:8] + b"{not json" + raw[17:], "not valid JSON"),
        (lambda raw: raw[: len(raw) - 16], "out of range"),
    ],
)
def test_malformed_safetensors_refused(tmp_path, corrupt, message):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ModelFormatError, match=message):
        read_header(path)


def test_only_targeted_tensors_are_decoded_and_progress_counts_every_byte(tmp_path, monkeypatch):
    """Untargeted tensors travel as bytes (never decoded into tensors); progress sums to the
    bytes of every tensor in the checkpoint."""
    from loraexport.lora import stream

    tensors = _checkpoint(tmp_path / "base")
    adapters = [_adapter(["layers.0.q", "layers.1.v"], 4, 8, 1)]
    decoded, real = [], torch.frombuffer

    def spy(buf, *args, **kwargs):
        decoded.append(len(buf))
        return real(buf, *args, **kwargs)

    monkeypatch.setattr(stream.torch, "frombuffer", spy)
    progress: list[int] = []
    (tmp_path / "out").mkdir()
    stream_merge(tmp_path / "base", adapters, tmp_path / "out", on_bytes=progress.append)
    targeted = [tensors[k] for k in ("layers.0.q.weight", "layers.1.v.weight")]
    assert sorted(decoded) == sorted(t.numel() * t.element_size() for t in targeted)
    assert sum(progress) == sum(t.numel() * t.element_size() for t in tensors.values())
