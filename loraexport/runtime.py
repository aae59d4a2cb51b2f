"""Run an exported model with onnxruntime alone (no torch): sessions, forward, greedy decoding.

``loraexport.json`` in the exported directory says which graphs exist and their tokens::

    from loraexport.runtime import OnnxModel
    model = OnnxModel("runs/demo")                 # CPU; provider="cuda" for CUDA
    ids = model.generate(input_ids, attention_mask, max_new_tokens=10)

This module imports only numpy and onnxruntime, so an app can ship without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# What onnxruntime raises for a model it cannot load (bad graph, bad protobuf, missing data...).
_ORT_LOAD_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "InvalidProtobuf", "NotImplemented")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)


KINDS = ("seq2seq", "causal", "encoder")


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RuntimeInputError(ValueError):
    """The exported directory cannot be run (missing files, unsafe external data)."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Fixed thread counts and no spinning: spinning threads distort timings on small machines."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def _tensors(graph):
    """Every TensorProto of ``graph``: initializers, sparse ones, and node attributes
    (``Constant`` values, tensors in subgraphs of ``If``/``Loop``/``Scan``), recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file that cannot be parsed, or any of whose tensors keeps its data outside
    the file's own directory (``../x``, an absolute path, a link leading out)."""
    import onnx  # part of the runtime dependencies; only the protobuf is parsed

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise RuntimeInputError(f"{path}: not a readable ONNX model ({first_line(e)})") from e
    root = path.parent.resolve()
    for tensor in _tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                try:
                    target = (root / entry.value).resolve()
                except (ValueError, OSError) as e:
                    raise RuntimeInputError(
                        f"{path.name}: unusable external data location {entry.value!r}"
                    ) from e
                if root != target and root not in target.parents:
                    raise RuntimeInputError(
                        f"{path.name}: external data {entry.value!r} points outside {root}; refusing to load"
                    )


def open_session(path: str | Path, provider: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    p = Path(path)
    if not p.is_file():
        raise RuntimeInputError(f"ONNX file not found: {p}")
    if provider not in PROVIDERS:
        raise RuntimeInputError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise RuntimeInputError(f"onnxruntime has no {PROVIDERS[provider]} on this machine")
    check_external_data(p)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(str(p), sess_options=session_options(threads), providers=providers)
    except _ORT_LOAD_ERRORS as e:
        raise RuntimeInputError(f"onnxruntime cannot load {p}: {first_line(e)}") from e


class OnnxModel:
    """An exported loraexport directory: ``model.onnx``, or ``encoder.onnx`` + ``decoder.onnx``.

    ``kind`` (from ``loraexport.json``) is ``seq2seq``, ``causal`` (a decoder with a KV cache)
    or ``encoder`` (no cache, no generation).
    """

    def __init__(self, directory: str | Path, provider: str = "cpu", threads: int | None = None) -> None:
        self.dir = Path(directory)
        meta_path = self.dir / "loraexport.json"
        if not meta_path.is_file():
            raise RuntimeInputError(f"{meta_path} not found: not a loraexport output directory")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.kind = self.meta["model"]["kind"]
            self.tokens = self.meta["model"].get("special_tokens", {})
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RuntimeInputError(
                f"{meta_path}: not a loraexport export description ({type(e).__name__})"
            ) from e
        if self.kind not in KINDS:
            raise RuntimeInputError(
                f"{meta_path}: unknown model kind {self.kind!r} (one of {', '.join(KINDS)})"
            )
        if not isinstance(self.tokens, dict):
            raise RuntimeInputError(f"{meta_path}: special_tokens must be an object")
        self.provider = provider
        self.threads = threads
        names = ["encoder", "decoder"] if self.kind == "seq2seq" else ["model"]
        self.sessions = {n: open_session(self.dir / f"{n}.onnx", provider, self.threads) for n in names}
        self.input_names = {n: {i.name for i in s.get_inputs()} for n, s in self.sessions.items()}
        dec = self.sessions["decoder" if self.kind == "seq2seq" else "model"]
        past = [i for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        self.n_heads, self.head_dim = (past[0].shape[1], past[0].shape[3]) if past else (0, 0)

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.n_layers, self.n_heads, self.head_dim

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.sessions[graph]
        wanted = self.input_names[graph]
        try:
            outs = sess.run(None, {k: v for k, v in feeds.items() if k in wanted})
        except _ORT_LOAD_ERRORS as e:  # e.g. an export of another model: its inputs do not fit
            raise RuntimeInputError(
                f"onnxruntime cannot run {graph}.onnx of {self.dir}: {first_line(e)}"
            ) from e
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}

    def forward_all(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_input_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Every output of a full forward without a cache, keyed ``<graph>.<output>``."""
        return chain_forward(
            self._run, self.kind, self.cache_shape, input_ids, attention_mask, decoder_input_ids
        )

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, decoder_input_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """The main output of a full forward: logits (B, T, V), or an encoder's first output."""
        outs = self.forward_all(input_ids, attention_mask, decoder_input_ids)
        if self.kind == "seq2seq":
            return outs["decoder.logits"]
        return outs["model.logits"] if "model.logits" in outs else next(iter(outs.values()))

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy decoding with the KV cache, all in onnxruntime; new ids (B, max_new_tokens).

        Rows keep decoding after their end token so the batch advances in lockstep; cut each
        row at its first end token. Causal prompts may be left-padded: positions count only
        unmasked tokens (``position_ids``), as Hugging Face models expect.
        """
        if self.kind == "encoder":
            raise RuntimeInputError("an encoder model does not generate")
        input_ids = input_ids.astype(np.int64)
        mask = attention_mask.astype(np.int64)
        B = input_ids.shape[0]
        past = empty_past(B, *self.cache_shape, np.float32)
        if self.kind == "seq2seq":
            graph = "decoder"
            enc = self._run("encoder", {"input_ids": input_ids, "attention_mask": mask})
            fixed = {"encoder_attention_mask": mask}
            fixed.update({k: v for k, v in enc.items() if k.startswith("encoder_key_values.")})
            step_ids = np.full((B, 1), self.tokens.get("bos", 1), dtype=np.int64)
        else:
            graph, fixed, step_ids = "model", {}, input_ids
        new = []
        for step in range(max_new_tokens):
            feeds = {"input_ids": step_ids, **past, **fixed}
            if self.kind == "causal":
                feeds["attention_mask"] = mask
                feeds["position_ids"] = positions(mask)[:, -step_ids.shape[1] :]
            outs = self._run(graph, feeds)
            nxt = outs["logits"][:, -1].argmax(-1).reshape(B, 1).astype(np.int64)
            new.append(nxt)
            if step == max_new_tokens - 1:
                break
            past = {
                k.replace("present.", "past_key_values.", 1): v
                for k, v in outs.items()
                if k.startswith("present.")
            }
            step_ids = nxt
            if self.kind == "causal":
                mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        return np.concatenate(new, axis=1)


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids from a 0/1 mask: unmasked tokens count 0, 1, 2, … (left padding gets 0)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def empty_past(batch: int, layers: int, heads: int, head_dim: int, dtype: type) -> dict[str, np.ndarray]:
    """A zero-length self-attention cache: the first call of a cached decoder."""
    z = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return {f"past_key_values.{i}.{k}": z for i in range(layers) for k in ("key", "value")}


def chain_forward(
    run,
    kind: str,
    shape: tuple[int, int, int],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    decoder_input_ids: np.ndarray | None = None,
    dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    """A full forward through the exported graphs, whatever runs them.

    ``run(graph, feeds) -> {output: array}`` is an onnxruntime session here, or the torch
    modules that were exported (``loraexport.verify``), so both sides chain graphs alike.
    Each ``run`` takes from ``feeds`` only the inputs its graph declares.
    """
    input_ids = input_ids.astype(np.int64)
    mask = attention_mask.astype(np.int64)
    if kind == "encoder":
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return {f"model.{k}": v for k, v in run("model", feeds).items()}
    past = empty_past(input_ids.shape[0], *shape, dtype)
    if kind == "seq2seq":
        enc = run("encoder", {"input_ids": input_ids, "attention_mask": mask})
        cross = {k: v for k, v in enc.items() if k.startswith("encoder_key_values.")}
        dec = run(
            "decoder",
            {
                "input_ids": decoder_input_ids.astype(np.int64),
                "encoder_attention_mask": mask,
                **past,
                **cross,
            },
        )
        return {**{f"encoder.{k}": v for k, v in enc.items()}, **{f"decoder.{k}": v for k, v in dec.items()}}
    feeds = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions(mask), **past}
    return {f"model.{k}": v for k, v in run("model", feeds).items()}
