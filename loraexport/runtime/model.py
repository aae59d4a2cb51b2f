"""Run an exported model with onnxruntime alone (no torch): sessions, forward, greedy decoding.

``loraexport.json`` in the exported directory says which graphs exist and their tokens::

    from loraexport.runtime import OnnxModel
    model = OnnxModel("runs/demo")                 # CPU; provider="cuda" for CUDA
    ids = model.generate(input_ids, attention_mask, max_new_tokens=10)

Everything is checked before it is used: ``loraexport.json`` is read bounded and key by key
(``read_export_meta``), an ONNX file's size and its external data's bounds before onnxruntime
reads or maps them (``check_external_data``).

This module imports only numpy, onnxruntime, onnx (when a file is checked) and the standard
library (through ``loraexport.core.untrusted``), so an app can ship without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from loraexport.artifact.schema import KINDS, META, check_export_meta, end_ids, read_export_meta  # noqa: F401 (re-exported)
from loraexport.core.untrusted import short_repr
from loraexport.errors import InvalidInputError, first_line
from loraexport.runtime.adapters import Active, AdapterOptions, adapter_bytes, find_adapters
from loraexport.runtime.decode import Growing, greedy, until_end
from loraexport.runtime.files import (  # noqa: F401 (re-exported)
    MAX_ONNX_BYTES,
    RuntimeInputError,
    check_external_data,
)
from loraexport.runtime.fused import (  # noqa: F401 (positions, empty_past: re-exported)
    empty_past,
    forward_growing,
    forward_stepwise,
    generate_shared,
    next_past,
    positions,
)
from loraexport.runtime.inputs import checked_inputs, vocab_size

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# What onnxruntime raises for a model it cannot load (bad graph, bad protobuf, missing data...).
_ORT_LOAD_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidGraph", "InvalidArgument", "NoSuchFile", "InvalidProtobuf", "NotImplemented")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)
# onnxruntime's own severities: 0 verbose … 3 error, 4 fatal. Its errors reach loraexport as
# exceptions (one line each); logged as well, they would print a coloured copy on fd 2 first.
_ORT_FATAL_ONLY = 4


# ---- sessions -----------------------------------------------------------------------------------
def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Fixed thread counts; ``spinning``: onnxruntime's threads spin between runs, waiting for
    the next one (its own default: an app decoding token after token gains from it). Off (the
    default here) for a harness that runs onnxruntime and torch in turn on the same cores, where a
    spinning thread takes the core the other side needs: verification, latency, ``make bench``.

    onnxruntime logs only fatal errors: every error it has also raises, and loraexport says
    it in one line (the log would print a second, ANSI-coloured copy on stderr first).
    """
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = _ORT_FATAL_ONLY
    return so


def open_session(
    path: str | Path, provider: str = "cpu", threads: int | None = None, spinning: bool = False
) -> ort.InferenceSession:
    p = Path(path)
    if provider not in PROVIDERS:
        raise RuntimeInputError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise RuntimeInputError(f"onnxruntime has no {PROVIDERS[provider]} on this machine")
    check_external_data(p)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        options = session_options(threads, spinning)
        return ort.InferenceSession(str(p), sess_options=options, providers=providers)
    except _ORT_LOAD_ERRORS as e:
        raise RuntimeInputError(f"onnxruntime cannot load {p}: {first_line(e)}") from e


class OnnxModel:
    """An exported loraexport directory: ``model.onnx``, or ``encoder.onnx`` + ``decoder.onnx``.

    ``kind`` (from ``loraexport.json``) is ``seq2seq``, ``causal`` (a decoder with a KV cache)
    or ``encoder`` (no cache, no generation).
    """

    def __init__(
        self,
        directory: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        meta: dict | None = None,
        adapter: str | Path | None = None,
        *,
        spinning: bool = True,
    ) -> None:
        """``meta``: the export's description when the caller holds it already (a pipeline
        checking its own export before ``loraexport.json`` is written); it is checked all the same.
        ``adapter``: an adapter-mode export's adapter active in every call that names none.
        ``spinning``: onnxruntime's threads spin between runs (its default, right for an app);
        loraexport's own checks and timings turn it off (``session_options``)."""
        self.dir = Path(directory)
        self.meta = (
            read_export_meta(self.dir, RuntimeInputError)
            if meta is None
            else check_export_meta(meta, self.dir / META, RuntimeInputError)
        )
        self.kind = self.meta["model"]["kind"]
        self.tokens = self.meta["model"]["special_tokens"]
        self.provider = provider
        self.threads = threads
        names = ["encoder", "decoder"] if self.kind == "seq2seq" else ["model"]
        self.spinning = spinning
        self.sessions = {n: open_session(self.dir / f"{n}.onnx", provider, threads, spinning) for n in names}
        self.input_names = {n: {i.name for i in s.get_inputs()} for n, s in self.sessions.items()}
        # graph inputs with defaults (--mode adapter: the LoRA factors), which an adapter fills
        self.lora_inputs = {
            n: {i.name for i in s.get_overridable_initializers()} for n, s in self.sessions.items()
        }
        dec = self.sessions["decoder" if self.kind == "seq2seq" else "model"]
        past = [i for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
        self.n_layers = len(past) // 2
        self.n_heads, self.head_dim = (past[0].shape[1], past[0].shape[3]) if past else (0, 0)
        # How an --optimize graph differs (``loraexport.json`` graphs.<name>): logits for the
        # last position only, and a key/value cache the graph updates in place (runtime.fused).
        graph = self.meta.get("graphs", {}).get("decoder" if self.kind == "seq2seq" else "model", {})
        self.logits = graph.get("logits", "all")
        self.kv_cache = graph.get("kv_cache", "growing")
        # --mode adapter: adapter files by name; ``adapter=`` activates one for a call
        self.adapters = find_adapters(self.dir, self.meta)
        shapes = {
            i.name: i.shape for sess in self.sessions.values() for i in sess.get_overridable_initializers()
        }
        names = set().union(*self.lora_inputs.values())
        self._adapters = AdapterOptions(self.adapters, names, adapter_bytes([shapes[n] for n in names]))
        self.adapter = adapter
        self._adapters.options(adapter)  # an unknown name fails here, not at the first call

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.n_layers, self.n_heads, self.head_dim

    def _run(self, graph: str, feeds: dict[str, np.ndarray], active: Active | None = None) -> dict:
        """One session run; ``active``: the adapter of this call (passed along, never kept on
        the model, so threads sharing it each run their own)."""
        sess = self.sessions[graph]
        wanted = self.input_names[graph]
        try:
            feeds = {k: v for k, v in feeds.items() if k in wanted}
            if active is not None:
                feeds |= active.feeds(self.lora_inputs[graph])
            outs = sess.run(None, feeds)
        except _ORT_LOAD_ERRORS as e:  # e.g. an export of another model: its inputs do not fit
            raise RuntimeInputError(
                f"onnxruntime cannot run {graph}.onnx of {self.dir}: {first_line(e)}"
            ) from e
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}

    def forward_all(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        decoder_input_ids: np.ndarray | None = None,
        adapter: str | Path | None = None,
    ) -> dict[str, np.ndarray]:
        """Every output of a full forward without a cache, keyed ``<graph>.<output>``, at every
        position: a graph that computes the last position's logits only is run one token at a
        time through its cache (teacher forcing), the path generation takes."""
        input_ids, attention_mask, decoder_input_ids = self._checked(
            input_ids, attention_mask, decoder_input_ids
        )
        active = self._active(adapter)
        if self.kind == "causal" and self.logits == "last":
            ids, mask = input_ids.astype(np.int64), attention_mask.astype(np.int64)
            if self.kv_cache == "shared-buffer":
                bound = self._bound(active)
                outs = _shared(forward_stepwise, self.sessions["model"], ids, mask, self.cache_shape, bound)
            else:
                run = lambda feeds: self._run("model", feeds, active)  # noqa: E731
                outs = forward_growing(run, ids, mask, self.cache_shape)
            return {f"model.{k}": v for k, v in outs.items()}
        return self._single_pass(input_ids, attention_mask, decoder_input_ids, active)

    def _active(self, adapter: str | Path | None) -> Active | None:
        """The adapter of a call: ``adapter`` (a name in ``adapters`` or a file), else the model's."""
        return self._adapters.options(self.adapter if adapter is None else adapter)

    def _bound(self, active: Active | None) -> dict:
        """``active``'s tensors, for the decoder's io-binding (``runtime.adapters.Active``)."""
        return {} if active is None else active.bound(self.lora_inputs["model"])

    def _single_pass(self, input_ids, attention_mask, decoder_input_ids=None, active=None) -> dict:
        return chain_forward(
            lambda graph, feeds: self._run(graph, feeds, active),
            self.kind,
            self.cache_shape,
            input_ids,
            attention_mask,
            decoder_input_ids,
        )

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        decoder_input_ids: np.ndarray | None = None,
        adapter: str | Path | None = None,
    ) -> np.ndarray:
        """The main output of one forward pass (a prompt pass): logits (B, T, V), (B, 1, V) from
        a graph that computes the last position's only, or an encoder's first output."""
        input_ids, attention_mask, decoder_input_ids = self._checked(
            input_ids, attention_mask, decoder_input_ids
        )
        outs = self._single_pass(input_ids, attention_mask, decoder_input_ids, self._active(adapter))
        if self.kind == "seq2seq":
            return outs["decoder.logits"]
        return outs["model.logits"] if "model.logits" in outs else next(iter(outs.values()))

    @property
    def vocab_size(self) -> int | None:
        """The ids the model takes, ``[0, vocab_size)`` (None: an export that does not say)."""
        return vocab_size(self.meta["model"])

    @property
    def _context(self) -> int | None:
        """The positions a sequence may use (a Hugging Face model's context, the reference's max_len)."""
        model = self.meta["model"]
        return model.get("context_length", model.get("max_len"))

    def _checked(self, input_ids, attention_mask, decoder_input_ids=None) -> tuple:
        """A call's inputs checked against this export before any onnxruntime call (``runtime.inputs``)."""
        return checked_inputs(self.vocab_size, self._context, input_ids, attention_mask, decoder_input_ids)

    def _check_length(self, input_ids: np.ndarray, max_new_tokens: int) -> None:
        """Refuse a request the model cannot hold (before a buffer for it is allocated): a
        non-integer count, or a causal prompt and new tokens beyond its ``context_length``."""
        if not isinstance(max_new_tokens, int | np.integer) or isinstance(max_new_tokens, bool):
            raise RuntimeInputError(f"max_new_tokens must be an integer, not {short_repr(max_new_tokens)}")
        if max_new_tokens < 0:
            raise RuntimeInputError(f"max_new_tokens must be 0 or more, not {max_new_tokens}")
        limit = self._context
        total = (input_ids.shape[1] if self.kind == "causal" and input_ids.ndim == 2 else 0) + max_new_tokens
        if isinstance(limit, int) and total > limit:
            raise RuntimeInputError(
                f"{input_ids.shape[-1]} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                f"context_length {limit}"
            )

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        adapter: str | Path | None = None,
    ) -> np.ndarray:
        """Greedy decoding with the KV cache, all in onnxruntime; new ids (B, max_new_tokens).

        One loop for every graph (``runtime.decode.greedy``) over its cache: growing, or the fused
        graph's shared buffer. Rows keep decoding after their end token so the batch advances in
        lockstep; cut each row at its first end token. Causal prompts may be left-padded:
        positions count only unmasked tokens (``position_ids``), as Hugging Face models expect.
        ``adapter``: an adapter-mode export's adapter (a name in ``adapters``, or an
        ``.onnx_adapter`` file).
        """
        return self._generate(input_ids, attention_mask, max_new_tokens, adapter)

    def generate_until_end(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        adapter: str | Path | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy decoding that stops each row at any of the export's end ids
        (``model.eos_token_ids``), as Hugging Face's ``generate`` does: the new ids, each row with
        its end token and then the pad id (the first end id where the model has none), and each
        row's length; decoding ends once every row has. Otherwise as ``generate``."""
        ends = end_ids(self.meta["model"])
        new = self._generate(input_ids, attention_mask, max_new_tokens, adapter, ends)
        pad = self.tokens.get("pad")
        return until_end(new, ends, pad if pad is not None else (ends[0] if ends else 0))

    def _generate(self, input_ids, attention_mask, max_new_tokens: int, adapter, ends=()) -> np.ndarray:
        active = self._active(adapter)
        if self.kind == "encoder":
            raise RuntimeInputError("an encoder model does not generate")
        input_ids, mask, _ = self._checked(input_ids, attention_mask)
        self._check_length(input_ids, max_new_tokens)
        if self.kind == "causal" and self.kv_cache == "shared-buffer":
            return _shared(
                generate_shared,
                self.sessions["model"],
                input_ids,
                mask,
                max_new_tokens,
                self.cache_shape,
                self._bound(active),
                ends,
            )
        B = input_ids.shape[0]
        if self.kind == "seq2seq":  # the decoder starts from <bos>, its positions its own count
            enc = self._run("encoder", {"input_ids": input_ids, "attention_mask": mask}, active)
            fixed = {"encoder_attention_mask": mask}
            fixed.update({k: v for k, v in enc.items() if k.startswith("encoder_key_values.")})
            run = lambda feeds: self._run("decoder", feeds, active)  # noqa: E731
            bos = np.full((B, 1), self.tokens.get("bos", 1), dtype=np.int64)
            decoder = Growing(run, B, self.cache_shape, fixed, causal=False)
            return _decoding(greedy, decoder.step, bos, np.ones_like(bos), max_new_tokens, ends)
        run = lambda feeds: self._run("model", feeds, active)  # noqa: E731
        return _decoding(
            greedy, Growing(run, B, self.cache_shape).step, input_ids, mask, max_new_tokens, ends
        )


def _shared(fn, session: ort.InferenceSession, *args):
    """``runtime.fused``'s ``fn`` on a shared-buffer graph; what it refuses, and what onnxruntime
    cannot run, is a ``RuntimeInputError``."""
    return _decoding(fn, session, *args)


def _decoding(fn, *args):
    """``fn(*args)`` (a decoding loop, ``runtime.decode``); what it refuses, and what onnxruntime
    cannot run, is a ``RuntimeInputError``."""
    try:
        return fn(*args)
    except InvalidInputError as e:
        raise RuntimeInputError(str(e)) from e
    except _ORT_LOAD_ERRORS as e:
        raise RuntimeInputError(f"onnxruntime cannot run this graph: {first_line(e)}") from e


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
