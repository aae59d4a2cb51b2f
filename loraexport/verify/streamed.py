"""A layer-streamed reference forward pass and greedy generation for Llama-style decoders.

The numerical reference an exported ONNX model is checked against has to be the PyTorch model
itself, but a 7B checkpoint (13.5 GB in float16) does not fit twice in memory, let alone in
float64. This module computes the same math as transformers' ``LlamaForCausalLM`` /
``MistralForCausalLM`` / ``Qwen2ForCausalLM`` straight from the safetensors checkpoint, reading
ONE decoder layer at a time: each layer is read once, cast to each requested compute dtype in
turn, applied to every stream of that dtype, and dropped before the next layer is read. Several
streams (dtype, with or without the LoRA branches) share that single pass over the file.

It needs torch and safetensors only. The math is transformers 5's (sdpa attention), quirks
included: RoPE angles, cos and sin are computed in float32 and then cast to the stream's dtype;
positions are those ``generate`` gives a left-padded batch (cumsum of the mask − 1, pads 0);
RMSNorm normalizes float16/bfloat16 in float32. One deliberate difference: transformers' RMSNorm
also casts float64 inputs to float32, which would put float32 rounding (~1e-7 relative) into the
float64 reference, so a float64 stream normalizes in float64. A float64 stream thus equals
``model.double()`` with that one cast removed to float64 round-off, and the unpatched
``model.double()`` to ~1e-7 relative.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from loraexport.export.qformat import EMBEDDING
from loraexport.models.hf.decoder_config import decoder_config, read_config
from loraexport.verify import streamed_ops
from loraexport.verify.streamed_ops import (
    Cast,
    linear_blocks,
    nbytes,
    rms_norm,
    rotate_half,
)

Stream = tuple[torch.dtype, bool]
Branch = tuple[torch.Tensor, torch.Tensor, float]
Weights = dict[str, torch.Tensor]
Cache = dict[Stream, list[tuple[torch.Tensor, torch.Tensor] | None]]

LINEARS = (*(f"self_attn.{p}_proj" for p in "qkvo"), *(f"mlp.{p}_proj" for p in ("gate", "up", "down")))
NORMS = ("input_layernorm", "post_attention_layernorm")
_ITEMSIZE = dict(F64=8, F32=4, F16=2, BF16=2, I64=8, I32=4, I16=2, I8=1, U8=1, BOOL=1)


def _is_linear(module: str) -> bool:
    """``model.layers.<i>.self_attn.q_proj`` and its kind: a projection of a decoder layer."""
    parts = module.split(".")
    return len(parts) == 5 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LINEARS


class StreamedDecoder:
    """A llama / mistral / qwen2 causal LM computed layer by layer from its safetensors files."""

    def __init__(
        self,
        model_dir: str | Path,
        branches: dict[str, list[Branch]] | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        overrides: dict[str, torch.Tensor] | None = None,
        magnitudes: dict[str, torch.Tensor] | None = None,
        weights: Callable[[str], torch.Tensor | None] | None = None,
    ) -> None:
        """``overrides``: tensors that replace the checkpoint's, by name (an adapter's trained
        biases and ``modules_to_save``), each of the shape it replaces. ``magnitudes``: DoRA's m
        by module, for a module with one branch: the LoRA streams compute
        ``m / ‖W + c·B·A‖ ⊙ (W·x + c·B·A·x) + bias`` there. ``weights(module)``: a projection's
        weight (out, in) instead of the checkpoint's, or None (``verify.dequantized.FileWeights``)."""
        self.model_dir = Path(model_dir)
        self.weights = weights
        self.progress = progress
        self.overrides = dict(overrides or {})
        c = self.config = decoder_config(read_config(self.model_dir))
        if c.unsupported is not None:
            raise ValueError(f"{self.model_dir}: {c.unsupported}")
        self.n_heads, self.n_kv, self.head_dim = c.heads, c.kv, c.head_dim
        self.eps, self.n_layers, self.windows = c.eps, c.layers, c.windows
        self._files: dict[str, Path] = {}  # tensor name -> shard
        self._meta: dict[str, tuple[list[int], int]] = {}  # tensor name -> (shape, itemsize)
        index = self.model_dir / "model.safetensors.index.json"
        shards = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        for shard in shards:
            with safe_open(self.model_dir / shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._files[name] = self.model_dir / shard
                    self._meta[name] = (list(sl.get_shape()), _ITEMSIZE[sl.get_dtype()])
        self._head_name = c.head_name("lm_head.weight" in self._meta) or "lm_head.weight"
        for name, t in self.overrides.items():
            if name not in self._meta or list(t.shape) != self._meta[name][0]:
                raise ValueError(f"{self.model_dir}: override {name} fits no tensor of the checkpoint")
        required = ["model.embed_tokens.weight", "model.norm.weight", self._head_name]
        for i in range(self.n_layers):
            required += [f"model.layers.{i}.{m}.weight" for m in NORMS + LINEARS]
        for name in required:
            if name not in self._meta:
                raise ValueError(f"{self.model_dir}: tensor {name} missing")
        self._layer_names = [
            [n for n in self._meta if n.startswith(f"model.layers.{i}.")] for i in range(self.n_layers)
        ]
        self.branches = dict(branches or {})
        for module, items in self.branches.items():
            self._check_branches(module, items)
        self.magnitudes = dict(magnitudes or {})
        for module, m in self.magnitudes.items():
            items = self.branches.get(module, [])
            if len(items) != 1 or tuple(m.shape) != (items[0][1].shape[0],):
                raise ValueError(f"DoRA magnitude of {module} fits no single LoRA branch of that module")
        self._peak = 0

    def _check_branches(self, module: str, items: list[Branch]) -> None:
        name = self._head_name if module == "lm_head" else module + ".weight"
        if not (module == "lm_head" or _is_linear(module)) or name not in self._meta:
            raise ValueError(f"LoRA branch {module!r} names no linear module of {self.model_dir}")
        out_f, in_f = self._meta[name][0]
        for a, b, _ in items:
            if not (
                a.dim() == b.dim() == 2
                and a.shape[1] == in_f
                and b.shape[0] == out_f
                and a.shape[0] == b.shape[1]
            ):
                raise ValueError(
                    f"LoRA branch of {module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit its weight "
                    f"({out_f}, {in_f}) (A must be (r, {in_f}), B ({out_f}, r))"
                )

    def _size(self, names: Iterable[str]) -> int:
        return sum(
            itemsize * torch.Size(shape).numel() for shape, itemsize in map(self._meta.__getitem__, names)
        )

    @property
    def weight_bytes(self) -> int:
        """Bytes of all the checkpoint's tensors as stored."""
        return self._size(self._meta)

    @property
    def max_resident_bytes(self) -> int:
        """Most weight bytes held at once in any call so far: the stored tensors of one group (a
        layer, the embedding rows, the final norm + lm_head) plus its cast copies and cast LoRA
        branches for one compute dtype (dtypes are handled one after the other)."""
        return self._peak

    def _read(self, names: Sequence[str]) -> Weights:
        """A group's tensors: from ``weights`` where it supplies them (the checkpoint's copy is then
        never read), else the checkpoint's, or ``overrides``'."""
        supplied: Weights = {}
        for n in names if self.weights is not None else ():
            module = "lm_head" if n == self._head_name else n.removesuffix(".weight")
            value = self.weights(module) if module == "lm_head" or _is_linear(module) else None
            if value is not None and list(value.shape) != self._meta[n][0]:
                raise ValueError(f"{module}: a weight {tuple(value.shape)} that is not the checkpoint's")
            if value is not None:
                supplied[n] = value
        rest = [n for n in names if n not in supplied]
        out: Weights = {}
        for path in dict.fromkeys(self._files[n] for n in rest):
            with safe_open(path, framework="pt") as f:
                out.update({n: f.get_tensor(n) for n in rest if self._files[n] == path})
        return out | {n: self.overrides[n] for n in rest if n in self.overrides} | supplied

    def _embedding_rows(self, uniq: torch.Tensor) -> torch.Tensor:
        """The embedding's rows ``uniq``: the export's dequantized ones where ``weights`` has them
        (a quantized table), else the checkpoint's."""
        supplied = getattr(self.weights, "rows", None)
        rows = supplied(EMBEDDING, uniq) if supplied is not None else None
        if rows is not None:
            return rows
        with safe_open(self._files["model.embed_tokens.weight"], framework="pt") as f:
            table = f.get_slice("model.embed_tokens.weight")
            return torch.cat([table[int(j) : int(j) + 1] for j in uniq])

    def _cast(
        self, stored: Weights, dtype: torch.dtype, modules: Iterable[str]
    ) -> tuple[Weights, dict[str, list[Branch]]]:
        """A group in one dtype (each tensor cast when read, then dropped: one copy at a time) and
        the LoRA branches of `modules`; the peak noted: the group, one cast tensor, the branches."""
        weights = Cast(stored, dtype)
        branches = {
            m: [(a.to(dtype), b.to(dtype), c) for a, b, c in self.branches[m]]
            for m in modules
            if m in self.branches
        }
        cast_branches = [t for bs in branches.values() for a, b, _ in bs for t in (a, b)]
        one = max((t.numel() * dtype.itemsize for t in stored.values() if t.dtype != dtype), default=0)
        one = (
            min(one, streamed_ops.CAST_BLOCK_BYTES) if not self.magnitudes else one
        )  # DoRA casts whole weights
        self._peak = max(self._peak, nbytes([*stored.values(), *cast_branches]) + one)
        return weights, branches

    def _apply(self, stored: Weights, streams: list[Stream], modules: list[str], fn: Callable) -> None:
        """Cast a group to each compute dtype in turn (with the branches of `modules` for the LoRA
        streams) and call fn(stream, weights, branches) for each stream of that dtype."""
        for d in dict.fromkeys(s[0] for s in streams):
            group = [s for s in streams if s[0] == d]
            w, br = self._cast(stored, d, modules if any(s[1] for s in group) else [])
            for s in group:
                fn(s, w, br if s[1] else {})
            del w, br  # before the next dtype's copy is made

    def _report(self, names: Iterable[str]) -> None:
        self._done += self._size(names)
        if self.progress is not None:
            self.progress(self._done, self._total)

    def _linear(self, x: torch.Tensor, w: Weights, br: dict[str, list[Branch]], module: str) -> torch.Tensor:
        bias = w.get(module + ".bias") if self.config.bias(module) else None
        if module in self.magnitudes and module in br:  # DoRA (a LoRA stream)
            ((a, b, c),) = br[module]
            weight = w[module + ".weight"]
            y = F.linear(x, weight) + c * F.linear(F.linear(x, a), b)
            norm = torch.linalg.vector_norm(weight + c * (b @ a), dim=1)  # (out,)
            y = y * (self.magnitudes[module].to(y.dtype) / norm)
            return y if bias is None else y + bias
        y = linear_blocks(x, w, module + ".weight", bias)
        for a, b, c in br.get(module, ()):
            y = y + c * F.linear(F.linear(x, a), b)
        return y

    def _layer(
        self,
        i: int,
        h: torch.Tensor,
        w: Weights,
        br: dict,
        mask: torch.Tensor,
        rope: tuple,
        cache: list | None,
    ) -> torch.Tensor:
        """One decoder layer (pre-norm attention + SiLU MLP) on one stream's hidden states (B, T, H)."""
        p = f"model.layers.{i}."
        bsz, t = h.shape[:2]
        x = rms_norm(h, w[p + "input_layernorm.weight"], self.eps)
        q, k, v = (
            self._linear(x, w, br, p + f"self_attn.{n}_proj").view(bsz, t, -1, self.head_dim).transpose(1, 2)
            for n in "qkv"
        )
        cos, sin = (r[:, None] for r in rope)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache[i] is not None:
                k, v = torch.cat((cache[i][0], k), dim=2), torch.cat((cache[i][1], v), dim=2)
            cache[i] = (k, v)
        rep = self.n_heads // self.n_kv  # GQA: each kv head serves `rep` consecutive query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(2, 3)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        half = h.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if half else None).to(h.dtype)
        attn = (probs @ v).transpose(1, 2).reshape(bsz, t, -1)
        h = h + self._linear(attn, w, br, p + "self_attn.o_proj")
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], self.eps)
        gate, up = self._linear(x, w, br, p + "mlp.gate_proj"), self._linear(x, w, br, p + "mlp.up_proj")
        return h + self._linear(F.silu(gate) * up, w, br, p + "mlp.down_proj")

    def _masks(self, attention_mask: torch.Tensor, t: int) -> dict[int | None, torch.Tensor]:
        """Boolean (B, 1, T, K) masks per sliding window for the last T queries over K keys."""
        k_len = attention_mask.shape[1]
        q_idx = torch.arange(k_len - t, k_len)[:, None]
        k_idx = torch.arange(k_len)[None, :]
        masks = {}
        for window in set(self.windows):
            allowed = (k_idx <= q_idx)[None] & attention_mask.bool()[:, None, :]
            if window is not None:
                allowed = allowed & (k_idx > q_idx - window)
            # A pad query sees no key at all: let it see all of them so that values stay finite.
            masks[window] = (allowed | ~allowed.any(-1, keepdim=True))[:, None]
        return masks

    def _pass(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        streams: Sequence[Stream],
        last_only: bool,
        cache: Cache | None = None,
    ) -> dict[Stream, torch.Tensor]:
        """Logits for the last ids.shape[1] positions of the mask (the earlier ones are in `cache`)."""
        streams = list(dict.fromkeys(streams))
        dtypes = dict.fromkeys(d for d, _ in streams)
        t = ids.shape[1]
        # Positions as transformers' generate computes them for left padding (pads get 0).
        pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -t:]
        masks = self._masks(attention_mask, t)
        freqs = pos[..., None].float() * self.config.inv_freq()  # in float32, then cast: as transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        rope = {d: (emb.cos().to(d), emb.sin().to(d)) for d in dtypes}

        uniq, inverse = ids.unique(return_inverse=True)
        rows = self._embedding_rows(uniq)
        hidden: dict[Stream, torch.Tensor] = {}
        self._apply({"rows": rows}, streams, [], lambda s, w, br: hidden.update({s: w["rows"][inverse]}))
        del rows

        def layer(i: int) -> Callable:
            def fn(s: Stream, w: Weights, br: dict) -> None:
                c = cache[s] if cache is not None else None
                hidden[s] = self._layer(i, hidden[s], w, br, masks[self.windows[i]], rope[s[0]], c)

            return fn

        for i, names in enumerate(self._layer_names):
            self._apply(self._read(names), streams, [f"model.layers.{i}.{m}" for m in LINEARS], layer(i))
            self._report(names)

        logits: dict[Stream, torch.Tensor] = {}

        def head(s: Stream, w: Weights, br: dict) -> None:
            h = hidden.pop(s)[:, -1] if last_only else hidden.pop(s)
            h = rms_norm(h, w["model.norm.weight"], self.eps)
            logits[s] = self._linear(h, w | {"lm_head.weight": w.stored(self._head_name)}, br, "lm_head")

        names = ["model.norm.weight", self._head_name]
        self._apply(self._read(names), streams, ["lm_head"], head)
        self._report(names)
        return logits

    def _start(self, passes: int) -> None:
        per_pass = [n for names in self._layer_names for n in names] + ["model.norm.weight", self._head_name]
        self._done, self._total = 0, passes * self._size(per_pass)

    @staticmethod
    def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask must both be (B, S)")

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        streams: Sequence[Stream] = ((torch.float32, True),),
        last_only: bool = False,
    ) -> dict[Stream, torch.Tensor]:
        """Logits per stream (compute dtype, with LoRA branches?) for a LEFT-padded batch, all streams
        in one pass over the layers: (B, S, V) in the stream's dtype, or (B, V) when last_only."""
        self._check_inputs(input_ids, attention_mask)
        self._start(1)
        return self._pass(input_ids, attention_mask, streams, last_only)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        *,
        dtype: torch.dtype = torch.float32,
        lora: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding with a KV cache, one pass over the layers per new token, no eos stopping.
        Returns the new tokens (B, max_new_tokens) int64."""
        self._check_inputs(input_ids, attention_mask)
        self._start(max_new_tokens)
        stream: Stream = (dtype, lora)
        cache: Cache = {stream: [None] * self.n_layers}
        ids, mask, new = input_ids, attention_mask, []
        for _ in range(max_new_tokens):
            logits = self._pass(ids, mask, [stream], last_only=True, cache=cache)[stream]
            ids = logits.argmax(-1, keepdim=True)
            new.append(ids)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        return torch.cat(new, dim=1) if new else input_ids.new_zeros((input_ids.shape[0], 0))
