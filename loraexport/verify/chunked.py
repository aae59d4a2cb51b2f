"""The fused decoder graph run a few layers at a time, so that verifying an export never holds the
whole model in onnxruntime: the ONNX side of bounded-memory verification.

onnxruntime holds a graph's weights, and for its fast kernels a prepacked copy of them
(``MatMulNBits`` with int8 activations: measured 9.1 GB for a 6.3 GB int4 7B export; with
prepacking off it holds them once but decodes ~40x slower and computes otherwise). So the graph
written by ``export.fused`` is cut, where its layers meet (the normed hidden state and the residual
stream, ``layers.<k>.input_norm.out|residual``), into chunks of at most ``CHUNK_BYTES`` of weights
and a quarter of the model,
each saved as its own small ``.onnx`` file reading the same ``model.onnx.data`` (hard-linked into a
scratch folder). Only one chunk's session is open at a time:

* ``forward_all`` (teacher forcing): chunk after chunk, each stepping through every position with its
  own growing cache, its boundary outputs kept for the next chunk: one session per chunk in all
  (chunk-major, not the runtime's token-major ``runtime.decode.teacher_forced``: that would open
  every chunk's session once per token);
* ``generate`` (greedy, the runtime's loop ``runtime.decode.greedy`` over this cache strategy):
  token after token, each through every chunk (a session per chunk per token: the whole model's
  load time per token); the prompt is one pass, then one token per call.

Each chunk runs exactly the nodes of the file, on the inputs the whole graph would give them, so the
numbers are those of the export; cutting only bounds what is resident.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from loraexport.artifact.output.plan import remove_stale, scratch_prefix
from loraexport.core.progress import Progress
from loraexport.errors import InvalidInputError
from loraexport.runtime.decode import greedy, positions
from loraexport.runtime.files import check_external_data
from loraexport.runtime.model import RuntimeInputError, open_session

CHUNK_BYTES = 512 * 1024**2  # weights per chunk at most (at least one layer)
MIN_CHUNKS = 4  # and at most a quarter of the model: what is resident stays a fraction of it
KV = ("key", "value")


def _bytes(t: onnx.TensorProto) -> int:
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    return len(t.raw_data)


def _layer_of(name: str) -> int | None:
    if name.startswith("layers."):
        part = name.split(".")[1]
        return int(part) if part.isdigit() else None
    return None


def _plan(proto: onnx.ModelProto, layers: int, budget: int) -> list[tuple[int, int]]:
    """Layer ranges [a, b), each holding at most ``budget`` bytes of weights (at least one layer);
    the embedding counts in the first, the LM head in the last."""
    per_layer = [0] * layers
    first = last = 0
    for t in proto.graph.initializer:
        i = _layer_of(t.name)
        if i is not None and i < layers:
            per_layer[i] += _bytes(t)
        elif t.name.startswith("embed_tokens"):
            first += _bytes(t)
        elif t.name.startswith("lm_head"):
            last += _bytes(t)
    per_layer[0] += first
    per_layer[-1] += last
    chunks, start, size = [], 0, 0
    for i, n in enumerate(per_layer):
        if i > start and size + n > budget:
            chunks.append((start, i))
            start, size = i, 0
        size += n
    chunks.append((start, layers))
    return chunks


def _boundary(k: int, layers: int) -> list[str]:
    """The tensors that carry the hidden state into layer ``k`` (or out of the last one)."""
    return ["logits"] if k == layers else [f"layers.{k}.input_norm.out", f"layers.{k}.input_norm.residual"]


def cut(proto: onnx.ModelProto, a: int, b: int, layers: int) -> onnx.ModelProto:
    """The part of the fused graph that computes layers [a, b): the graph's own inputs it uses,
    the boundary into layer ``a`` as inputs, the boundary out of layer ``b - 1`` (``logits`` for
    the last chunk) and its layers' ``present.*`` as outputs. Initializers keep their external data."""
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    stops = set() if a == 0 else set(_boundary(a, layers))
    wanted = _boundary(b, layers) + [f"present.{i}.{k}" for i in range(a, b) for k in KV]
    keep: set[int] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if name in stops or node is None or id(node) in keep:
            continue
        keep.add(id(node))
        todo.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    inputs = [i for i in graph.input if i.name in used]
    inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, None) for s in sorted(stops)]
    declared = {o.name: o for o in graph.output}
    outputs = [declared.get(w) or helper.make_tensor_value_info(w, TensorProto.FLOAT, None) for w in wanted]
    inits = [t for t in graph.initializer if t.name in used]
    sub = helper.make_graph(nodes, f"layers_{a}_{b}", inputs, outputs, inits)
    return helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)


def scratch_dir(beside: Path, what: str, avoid: tuple[Path, ...] = ()) -> str:
    """A scratch folder beside ``beside`` (the same file system: the weights are hard-linked into
    it, not copied), removed by its user; in the system's temporary folder instead when beside it
    would be inside one of ``avoid`` (the inputs: nothing is written inside an input). Its name
    says which run made it (``artifact.output.plan.scratch_prefix``), so the next run there
    removes it if that run was killed. One line when the folder cannot be written."""
    parent = beside.resolve().parent
    inside = any(parent == a.resolve() or a.resolve() in parent.parents for a in avoid)
    where = Path(tempfile.gettempdir()) if inside else parent
    remove_stale(None, {str(i): a for i, a in enumerate(avoid)}, where)  # what runs killed left here
    try:
        return tempfile.mkdtemp(prefix=scratch_prefix(what), dir=where)
    except OSError as e:
        raise InvalidInputError(
            f"cannot write a scratch folder beside {beside} (it holds hard links to the weights "
            f"while onnxruntime runs them a few layers at a time): {e.strerror or e}"
        ) from e


def _cache_dims(proto: onnx.ModelProto, meta: dict, where: Path) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the graph, read from its cache inputs and checked against
    its ``loraexport.json`` (untrusted: a wrong count would cut the graph wrongly)."""
    past = {i.name: i for i in proto.graph.input if i.name.startswith("past_key_values.")}
    layers = len(past) // 2
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    first = past.get("past_key_values.0.key")
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim] if first is not None else []
    said = (model.get("n_layers"), model.get("kv_heads"), model.get("head_dim"))
    if (
        not layers
        or len(dims) != 4
        or said != (layers, dims[1], dims[3])
        or set(past) != {f"past_key_values.{i}.{k}" for i in range(layers) for k in KV}
    ):
        raise InvalidInputError(
            f"{where / 'loraexport.json'}: n_layers, kv_heads, head_dim {list(said)} do not describe the "
            f"graph's cache ({layers} layers of {dims[1:2] + dims[3:4]})"
        )
    return layers, dims[1], dims[3]


def is_fused(meta: dict) -> bool:
    """Whether an export is the graph ``export.fused`` writes (its layer boundaries are known)."""
    return (meta.get("optimize") or {}).get("layout") == "fused" and meta.get("model", {}).get(
        "kind"
    ) == "causal"


class ChunkedDecoder:
    """An export's fused decoder graph, run chunk by chunk (see the module docstring). A context
    manager: its scratch folder (the chunk files and a hard link of the weights) goes on exit."""

    def __init__(
        self,
        directory: Path,
        meta: dict,
        threads: int | None = None,
        budget: int | None = None,
        progress: bool = False,
        avoid: tuple[Path, ...] = (),
    ) -> None:
        """``progress``: a bar (on a terminal) over the calls of ``forward_all`` and ``generate``;
        ``avoid``: the inputs, inside which no scratch folder is made (``scratch_dir``)."""
        self.dir, self.progress = Path(directory), progress
        self.threads = threads
        try:
            check_external_data(self.dir / "model.onnx")  # names the export's own files, bounded
        except RuntimeInputError as e:
            raise InvalidInputError(str(e)) from e
        proto = onnx.load(str(self.dir / "model.onnx"), load_external_data=False)
        self.layers, self.kv_heads, self.head_dim = _cache_dims(proto, meta, self.dir)
        total = sum(_bytes(t) for t in proto.graph.initializer)
        self.ranges = _plan(proto, self.layers, budget or min(CHUNK_BYTES, total // MIN_CHUNKS))
        self._scratch = scratch_dir(self.dir, "chunks", avoid)
        try:  # a signal or a full disk here leaves nothing behind (the hard link holds the weights)
            scratch = Path(self._scratch)
            data = self.dir / "model.onnx.data"
            if data.is_file():
                try:
                    (scratch / data.name).hardlink_to(data)
                except OSError:  # another file system: a copy (the export's size, once)
                    shutil.copyfile(data, scratch / data.name)
            self.files = []
            for a, b in self.ranges:
                path = scratch / f"layers_{a}_{b}.onnx"
                onnx.save_model(cut(proto, a, b, self.layers), str(path))
                self.files.append(path)
        except BaseException:
            self.close()
            raise
        del proto

    def __enter__(self) -> ChunkedDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self._scratch)

    @property
    def chunks(self) -> int:
        return len(self.ranges)

    def _empty(self, batch: int, a: int, b: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {f"past_key_values.{i}.{k}": z for i in range(a, b) for k in KV}

    def _run(self, session, a: int, b: int, feeds: dict, past: dict, carry: list[np.ndarray] | None):
        """One call of chunk [a, b): its boundary outputs and its next (grown) past."""
        names = {i.name for i in session.get_inputs()}
        full = {**feeds, **past}
        if carry is not None:
            full.update(zip(_boundary(a, self.layers), carry, strict=True))
        wanted = _boundary(b, self.layers) + [f"present.{i}.{k}" for i in range(a, b) for k in KV]
        out = dict(
            zip(wanted, session.run(wanted, {k: v for k, v in full.items() if k in names}), strict=True)
        )
        grown = {
            k.replace("present.", "past_key_values.", 1): v
            for k, v in out.items()
            if k.startswith("present.")
        }
        return [out[n] for n in _boundary(b, self.layers)], grown

    def forward_all(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of every position (B, T, V), one token per call, as
        ``runtime.OnnxModel.forward_all`` computes them for a last-position graph."""
        ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
        batch, length = ids.shape
        pos = positions(mask)
        carries: list[list[np.ndarray] | None] = [None] * length
        bar = Progress(self.chunks * length, "onnxruntime", "calls", self.progress)
        for (a, b), path in zip(self.ranges, self.files, strict=True):
            session = open_session(path, "cpu", self.threads)
            past = self._empty(batch, a, b)
            for t in range(length):
                bar.update(1)
                feeds = {
                    "input_ids": ids[:, t : t + 1],
                    "attention_mask": mask[:, : t + 1],
                    "position_ids": pos[:, t : t + 1],
                }
                carries[t], past = self._run(session, a, b, feeds, past, carries[t])
            del session, past
        bar.close()
        return np.concatenate([c[0] for c in carries], axis=1)  # each (B, 1, V)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy new tokens (B, max_new_tokens), by the runtime's loop (``runtime.decode.greedy``):
        each call runs through every chunk in turn (one chunk's session open at a time, unless
        there is one)."""
        batch = input_ids.shape[0]
        pasts = [self._empty(batch, a, b) for a, b in self.ranges]
        sessions = [open_session(self.files[0], "cpu", self.threads)] if self.chunks == 1 else None
        bar = Progress(max_new_tokens * self.chunks, "onnxruntime generate", "calls", self.progress)

        def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            carry = None
            for c, (a, b) in enumerate(self.ranges):
                session = sessions[0] if sessions else open_session(self.files[c], "cpu", self.threads)
                carry, pasts[c] = self._run(session, a, b, feeds, pasts[c], carry)
                del session
                bar.update(1)
            return carry[0][:, -1]

        try:
            return greedy(step, input_ids, attention_mask, max_new_tokens)
        finally:
            bar.close()
