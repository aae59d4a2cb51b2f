"""Export a checkpoint larger than memory: the fused decoder graph (``export.fused``) written from
the safetensors files tensor by tensor, never a model object.

``CheckpointSource`` reads one tensor at a time (a seek and a read into a fresh buffer: nothing
stays mapped) and hands the writer each projection already merged (``W0 + Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` in
float64 by ``merge.merge_state_dict`` on that one tensor, so bit-identical to the in-memory merge,
then cast once to the storage dtype) or with its LoRA branches kept unmerged (``--keep-adapter``).
The writer stores each initializer in ``model.onnx.data`` as soon as it is made, in float32,
float16/bfloat16, or quantized to int8/int4 on the fly. Peak memory is the interpreter plus one
packed group (q|k|v or gate|up) in float32 and its quantized copy: for a 7B model some 0.5 GB,
whatever the model's size (``make bench-7b``).

Only the families the fused graph writes (Llama, Mistral, Qwen2); which tensors a family needs is
the fused writer's business, which checkpoint holds them this module's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from loraexport.errors import AdapterMismatchError, ModelFormatError
from loraexport.export.fused_source import _Linear
from loraexport.lora.adapter import Adapter
from loraexport.lora.merge import cast_checked, merge_state_dict
from loraexport.lora.stream import (
    DTYPES,
    TensorInfo,
    _check_targets,
    _restrict,
    checkpoint_shards,
    read_header,
)
from loraexport.lora.weights import adapter_weights
from loraexport.models import strict
from loraexport.models.hf.decoder_config import decoder_config, read_config


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or shards), read one at a time."""

    def __init__(self, model_dir: str | Path, on_read: Callable[[int], None] | None = None) -> None:
        """``on_read(n)``: called with the bytes of each tensor read (progress)."""
        self.dir, self.on_read = Path(model_dir), on_read
        shards, index = checkpoint_shards(self.dir)
        self.tensors: dict[str, tuple[Path, TensorInfo]] = {}
        seen: dict[str, str] = {}
        for shard in shards:
            for t in read_header(self.dir / shard)[0]:
                if t.name in seen:  # loaders differ on which copy wins: refuse both
                    raise ModelFormatError(
                        f"{self.dir}: tensor {t.name!r} is in two shards ({seen[t.name]}, {shard})"
                    )
                seen[t.name] = shard
                if index is not None and index["weight_map"].get(t.name) != shard:
                    continue  # the index says where each tensor is: only there
                self.tensors[t.name] = (self.dir / shard, t)
        missing = sorted(set(index["weight_map"]) - set(self.tensors)) if index is not None else []
        if missing:
            raise ModelFormatError(
                f"{self.dir}: the index places {missing[0]!r} in {index['weight_map'][missing[0]]!r}, "
                "which does not hold it"
            )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(math.prod(t.shape) for _, t in self.tensors.values())

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1].shape)

    def _info(self, name: str) -> tuple[Path, TensorInfo]:
        if name not in self.tensors:
            raise ModelFormatError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        return self.tensors[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype), in a buffer of its own."""
        path, t = self._info(name)
        if not DTYPES[t.dtype].is_floating_point:
            raise ModelFormatError(f"{path}: tensor {name!r} is {t.dtype}, not a float")
        buf = bytearray(t.nbytes)
        with open(path, "rb", buffering=0) as f:
            f.seek(t.start)
            view, got = memoryview(buf), 0
            while got < t.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise ModelFormatError(f"{path}: truncated in tensor {name!r}")
                got += n
        if self.on_read:
            self.on_read(t.nbytes)
        if not t.nbytes:
            return torch.empty(t.shape, dtype=DTYPES[t.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[t.dtype]).reshape(t.shape)


class CheckpointSource:
    """A ``fused.Source`` over a checkpoint and LoRA adapters: merged per tensor (``merge``) or kept
    as branches. ``storage``: the dtype merged weights are cast to once (float32 unless the export
    stores half precision); tensors the adapters do not touch are upcast exactly."""

    def __init__(
        self,
        model_dir: str | Path,
        adapters: list[Adapter] | None = None,
        weights: list[float] | None = None,
        *,
        merge: bool = True,
        storage: torch.dtype = torch.float32,
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        from loraexport.models.hf.common import read_config as hf_config

        self.checkpoint = Checkpoint(model_dir, on_read)
        read_config(self.checkpoint.dir)  # a fused family, before transformers reads it
        self.config = hf_config(self.checkpoint.dir)[1].get_text_config(decoder=True)
        self.decoder = decoder_config(self.config)
        self.layers = int(self.decoder.layers)
        self.adapters = list(adapters or [])
        self.weights = adapter_weights(len(self.adapters), weights)
        self.merge, self.storage = merge, storage
        self._check_layers()
        self._replaced = self.replacements
        expected = self.expected_shapes()
        linears = {n.removesuffix(".weight") for n, shape in expected.items() if len(shape) == 2}
        linears.discard("model.embed_tokens")
        for adapter in self.adapters:
            check_adapter(adapter, self.checkpoint)
            for path in sorted(set(adapter.weights) - linears):
                raise AdapterMismatchError(
                    f"adapter module {path!r}: a streamed export adapts the decoder's projections and "
                    "an untied lm_head only"
                )
            for name in sorted(set(adapter.replacements) - set(expected)):  # a stored buffer, say
                raise AdapterMismatchError(f"adapter replaces {name!r}, which the export does not read")

    def _check_layers(self) -> None:
        """Every tensor the graph reads is there with the shape the config gives it, and every
        tensor there is one the graph reads (or a stored copy of a buffer it computes: ``strict``),
        from the headers, before anything is read or written (a checkpoint is untrusted input)."""
        names = set(self.checkpoint.tensors)
        if f"model.layers.{self.layers}.self_attn.q_proj.weight" in names:
            raise ModelFormatError(
                f"{self.checkpoint.dir}: more layers than num_hidden_layers ({self.layers})"
            )
        expected = self.expected_shapes()
        strict.refuse(
            f"{self.checkpoint.dir}: the checkpoint does not match config.json",
            [n for n in expected if n not in names],
            [n for n in names if n not in expected and not strict.computed_buffer(n)],
        )
        for name, shape in expected.items():
            if self.checkpoint.shape(name) != shape:
                raise ModelFormatError(
                    f"{self.checkpoint.dir}: {name} has shape {list(self.checkpoint.shape(name))}; "
                    f"config.json gives {list(shape)}"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor the fused graph reads, as config.json gives them."""
        c = self.decoder
        h, heads, kv, hd = int(c.hidden), int(c.heads), int(c.kv), int(c.head_dim)
        inter, vocab = int(c.intermediate), int(c.vocab)
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
        if c.head_name(self.checkpoint.has("lm_head.weight")) != "model.embed_tokens.weight":
            out["lm_head.weight"] = (vocab, h)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            out |= {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)}
            out |= {
                f"{p}.self_attn.q_proj.weight": (heads * hd, h),
                f"{p}.self_attn.o_proj.weight": (h, heads * hd),
            }
            out |= {f"{p}.self_attn.{n}.weight": (kv * hd, h) for n in ("k_proj", "v_proj")}
            out |= {f"{p}.mlp.{n}.weight": (inter, h) for n in ("gate_proj", "up_proj")}
            out[f"{p}.mlp.down_proj.weight"] = (h, inter)
            sizes = {"q_proj": heads * hd, "k_proj": kv * hd, "v_proj": kv * hd, "o_proj": h}
            sizes |= {"gate_proj": inter, "up_proj": inter, "down_proj": h}
            for n, size in sizes.items():
                module = f"{p}.{'mlp' if n in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{n}"
                if c.bias(module):
                    out[f"{module}.bias"] = (size,)
        return out

    @property
    def replacements(self) -> dict[str, torch.Tensor]:
        """The adapters' replacements (trained biases, modules_to_save) by tensor name; two adapters
        replacing one tensor with different values are refused, as the in-memory merge refuses them."""
        out: dict[str, torch.Tensor] = {}
        for adapter in self.adapters:
            for name, t in adapter.replacements.items():
                if name in out and not torch.equal(out[name], t):
                    raise AdapterMismatchError(f"two adapters replace {name!r} with different values")
                out[name] = t
        return out

    def _tensor(self, name: str) -> torch.Tensor:
        """A tensor with the adapters' replacements (trained biases, modules_to_save) applied."""
        return self._replaced[name] if name in self._replaced else self.checkpoint.read(name)

    def linear_shape(self, path: str) -> tuple[int, int]:
        name = self._head_name() if path == "lm_head" else f"{path}.weight"
        shape = self.checkpoint.shape(name)
        if len(shape) != 2:
            raise ModelFormatError(f"{self.checkpoint.dir}: {name} has shape {shape}, not 2-D")
        return shape[0], shape[1]

    def linear(self, path: str) -> _Linear:
        key = f"{path}.weight"
        w0 = self._tensor(key)
        bias = self._tensor(f"{path}.bias") if self.decoder.bias(path) else None
        touched = [a for a in self.adapters if path in a.weights or key in a.replacements]
        if self.merge and touched:
            merged, _ = merge_state_dict(
                {key: w0},
                [_restrict(a, key) for a in self.adapters],
                self.weights,
                storage_dtype=self.storage,
            )
            return _Linear(merged[key], bias)
        weight = cast_checked(w0, self.storage, key) if self.merge else w0
        branches = tuple(
            (a.weights[path][0], a.weights[path][1], float(w * a.config.scaling(path)))
            for a, w in zip(self.adapters, self.weights, strict=True)
            if path in a.weights
        )
        return _Linear(weight, bias, branches)

    def vector(self, name: str) -> torch.Tensor:
        return self._tensor(name)

    def embedding(self) -> torch.Tensor:
        return self._tensor("model.embed_tokens.weight")

    def _head_name(self) -> str:
        name = self.decoder.head_name(self.checkpoint.has("lm_head.weight"))
        if name is None:
            raise ModelFormatError(
                f"{self.checkpoint.dir}: no lm_head.weight and tie_word_embeddings is not set"
            )
        return name

    def kept(self) -> bool:
        return bool(self.adapters) and not self.merge

    def tied_head(self) -> bool:
        return not self.checkpoint.has("lm_head.weight") and self._head_name() == "model.embed_tokens.weight"

    def lm_head(self) -> _Linear:
        if self.checkpoint.has("lm_head.weight"):
            return self.linear("lm_head")  # an adapter may target it: merged or kept like the others
        return _Linear(self._tensor(self._head_name()), None)  # tied (check_adapter: not adapted)


def check_adapter(adapter: Adapter, checkpoint: Checkpoint) -> None:
    """What ``Adapter.check_fits`` checks against a model, from the checkpoint's headers: every
    module exists as a 2-D weight its factors fit, the config targets exactly these, replacements
    have the shapes they replace. The fused families' projections are ``nn.Linear``: fan_in_fan_out
    is resolved to False, as PEFT does."""
    for path in sorted(adapter.weights):
        a, b = adapter.weights[path]
        key = f"{path}.weight"
        if not checkpoint.has(key) or len(checkpoint.shape(key)) != 2:
            raise AdapterMismatchError(
                f"target module {path!r}: the checkpoint has no 2-D tensor {key!r} "
                "(is this adapter for another architecture?)"
            )
        out_f, in_f = checkpoint.shape(key)
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise AdapterMismatchError(
                f"adapter module {path!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"fit a linear layer of {in_f} -> {out_f} features"
            )
    _check_targets(adapter, {n: t for n, (_, t) in checkpoint.tensors.items()})
    for name, t in adapter.replacements.items():
        if not checkpoint.has(name):
            raise AdapterMismatchError(f"adapter replaces {name!r}, which the checkpoint does not have")
        if tuple(t.shape) != checkpoint.shape(name):
            raise AdapterMismatchError(
                f"adapter tensor for {name!r} has shape {tuple(t.shape)} but the checkpoint's is "
                f"{checkpoint.shape(name)}"
            )
    adapter.config.fan_in_fan_out = False


def weight_bytes(model_dir: str | Path) -> int:
    """The checkpoint's tensor bytes as stored, from its headers (nothing read)."""
    return Checkpoint(model_dir).nbytes


def float32_bytes(model_dir: str | Path) -> int:
    """The bytes the checkpoint's weights take in float32 (what a torch model of it holds)."""
    return 4 * Checkpoint(model_dir).numel
