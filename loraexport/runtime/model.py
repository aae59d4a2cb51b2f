"""Run an exported model with onnxruntime alone (no torch): forward, decoding, text.

``loraexport.json`` in the exported directory says which graphs exist and their tokens::

    from loraexport.runtime import OnnxModel
    model = OnnxModel("runs/demo")                 # CPU; provider="cuda" for CUDA
    ids = model.generate(input_ids, attention_mask, max_new_tokens=10)
    text = model.generate_text("The capital of France is", 16)   # an export with tokenizer.json

Everything is checked before it is used: ``loraexport.json`` is read bounded and key by key
(``read_export_meta``), an ONNX file's size and its external data's bounds before onnxruntime
reads or maps them (``check_external_data``).

This module imports only numpy, onnxruntime, onnx (when a file is checked), tokenizers (for
text) and the standard library (through ``loraexport.core.untrusted``), so an app can ship
without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

from loraexport.artifact.schema import KINDS, META, check_export_meta, end_ids, read_export_meta  # noqa: F401 (re-exported)
from loraexport.core.untrusted import short_repr
from loraexport.errors import first_line
from loraexport.runtime import text
from loraexport.runtime.adapters import Active, AdapterOptions, adapter_bytes, find_adapters
from loraexport.runtime.chain import chain_forward
from loraexport.runtime.decode import Growing, Step, argmax, greedy, tokens, until_end
from loraexport.runtime.files import (  # noqa: F401 (re-exported)
    MAX_ONNX_BYTES,
    RuntimeInputError,
    check_external_data,
)
from loraexport.runtime.fused import (  # noqa: F401 (positions, empty_past: re-exported)
    SharedCache,
    empty_past,
    forward_growing,
    forward_stepwise,
    positions,
)
from loraexport.runtime.inputs import checked_inputs, vocab_size
from loraexport.runtime.sampling import Sampling
from loraexport.runtime.sessions import (  # noqa: F401 (PROVIDERS, session_options: re-exported)
    ORT_ERRORS,
    PROVIDERS,
    open_session,
    session_options,
    translated,
)

# generate_text's keyword arguments and their defaults (stream_text takes the same)
TEXT_OPTIONS = dict(temperature=0.0, top_k=None, top_p=None, seed=None, adapter=None, chat=False)


def _check_outputs(sessions: dict, meta: dict, directory: Path) -> None:
    """Each graph's outputs are those ``loraexport.json`` describes (``graphs.<name>.outputs``), in
    order: a graph that lost one (a cache a later step feeds back) is refused when opened, not
    midway through a generation."""
    graphs = meta.get("graphs") if isinstance(meta.get("graphs"), dict) else {}
    for name, session in sessions.items():
        described = graphs.get(name, {}).get("outputs") if isinstance(graphs.get(name), dict) else None
        got = [o.name for o in session.get_outputs()]
        if isinstance(described, list) and got != described:
            missing = [o for o in described if o not in got] or ["their order"]
            raise RuntimeInputError(
                f"{directory / name}.onnx: its outputs are not those loraexport.json describes "
                f"({short_repr(missing[0])} differs)"
            )


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
        _check_outputs(self.sessions, self.meta, self.dir)
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
        except (*ORT_ERRORS, ValueError) as e:  # e.g. an export of another model: its inputs do not fit
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
                outs = translated(
                    forward_stepwise, self.sessions["model"], ids, mask, self.cache_shape, bound
                )
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
        step, ids, mask = self._decoder(input_ids, attention_mask, max_new_tokens, adapter)
        return translated(greedy, step, ids, mask, max_new_tokens, ends)

    def stream_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        adapter: str | Path | None = None,
        pick: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> Iterator[np.ndarray]:
        """Each new column of ids (B,) as it is made, until every row has made one of the
        export's end ids (``model.eos_token_ids``) or ``max_new_tokens`` are made. ``pick(logits
        (B, V)) -> ids (B,)`` chooses each token: greedy by default, or ``Sampling(...).picker()``.
        The inputs are checked when this is called, before the first token."""
        step, ids, mask = self._decoder(input_ids, attention_mask, max_new_tokens, adapter)
        return _guarded(tokens(step, ids, mask, max_new_tokens, pick or argmax, end_ids(self.meta["model"])))

    def _decoder(
        self, input_ids, attention_mask, max_new_tokens: int, adapter
    ) -> tuple[Step, np.ndarray, np.ndarray]:
        """The decoder's cache strategy (``runtime.decode``) and the prompt it starts from, once
        the call is checked: the fused graph's shared buffer, or a growing cache."""
        active = self._active(adapter)
        if self.kind == "encoder":
            raise RuntimeInputError("an encoder model does not generate")
        input_ids, mask, _ = self._checked(input_ids, attention_mask)
        self._check_length(input_ids, max_new_tokens)
        B = input_ids.shape[0]
        if self.kind == "causal" and self.kv_cache == "shared-buffer":
            total = input_ids.shape[1] + max_new_tokens
            bound = self._bound(active)
            cache = translated(SharedCache, self.sessions["model"], B, total, self.cache_shape, bound)
            return cache.step, input_ids, mask
        if self.kind == "seq2seq":  # the decoder starts from <bos>, its positions its own count
            enc = self._run("encoder", {"input_ids": input_ids, "attention_mask": mask}, active)
            fixed = {"encoder_attention_mask": mask}
            fixed.update({k: v for k, v in enc.items() if k.startswith("encoder_key_values.")})
            run = lambda feeds: self._run("decoder", feeds, active)  # noqa: E731
            bos = np.full((B, 1), self.tokens.get("bos", 1), dtype=np.int64)
            return Growing(run, B, self.cache_shape, fixed, causal=False).step, bos, np.ones_like(bos)
        run = lambda feeds: self._run("model", feeds, active)  # noqa: E731
        return Growing(run, B, self.cache_shape).step, input_ids, mask

    # ---- text (``runtime.text``: the export's tokenizer.json, read with the tokenizers library) ----
    @cached_property
    def tokenizer(self) -> text.ExportTokenizer:
        """The export's tokenizer, read at its first use; a ``RuntimeInputError`` where the export
        has no ``tokenizer.json`` (the reference model: its vocabulary is its own, use ids)."""
        return text.ExportTokenizer(self.dir, self.vocab_size)

    def generate_text(
        self,
        prompt: str | list[dict],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        adapter: str | Path | None = None,
        chat: bool = False,
    ) -> str:
        """The text generated after ``prompt``, up to any of the export's end ids (left out) or
        ``max_new_tokens``, special tokens left out. Greedy by default; ``temperature`` > 0
        samples, from the ``top_k`` tokens and the fewest whose probabilities sum to ``top_p``,
        drawn from ``numpy.random.default_rng(seed)``. ``chat``: ``prompt`` (a user message, or a
        list of ``{"role", "content"}``) goes through the export's chat template (needs jinja2).
        Every argument is checked before any work (``RuntimeInputError`` naming it)."""
        sampling = Sampling(temperature, top_k, top_p, seed)
        return text.generate(self, prompt, max_new_tokens, sampling, adapter, chat)

    def stream_text(self, prompt: str | list[dict], max_new_tokens: int, **options) -> Iterator[str]:
        """``generate_text`` as pieces of text, each yielded as soon as its tokens make whole
        characters: joined, they are ``generate_text``'s text. ``options``: ``generate_text``'s
        keyword arguments (``temperature``, ``top_k``, ``top_p``, ``seed``, ``adapter``,
        ``chat``). Arguments checked when called."""
        unknown = sorted(set(options) - set(TEXT_OPTIONS))
        if unknown:
            raise RuntimeInputError(
                f"stream_text: no argument {unknown[0]!r}; it takes {', '.join(TEXT_OPTIONS)}"
            )
        given = TEXT_OPTIONS | options
        sampling = Sampling(*(given[k] for k in ("temperature", "top_k", "top_p", "seed")))
        return text.stream(self, prompt, max_new_tokens, sampling, given["adapter"], given["chat"])

    def embed(
        self, texts: list[str], *, normalize: bool = True, adapter: str | Path | None = None
    ) -> np.ndarray:
        """An encoder's embedding of each text (N, hidden): its last hidden states averaged over
        the text's tokens (mean pooling, as sentence-transformers' all-MiniLM-L6-v2), scaled to
        length 1 unless ``normalize=False``."""
        return text.embed(self, texts, normalize, adapter)


def _guarded(columns: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``columns`` (a decoding loop), with what it refuses and what onnxruntime cannot run said
    as a ``RuntimeInputError`` (``sessions.translated``)."""
    while (column := translated(next, columns, None)) is not None:
        yield column
