"""Text in, text out, without torch or transformers: the export's ``tokenizer.json`` read with the
tokenizers library (``ExportTokenizer``), text generated or streamed (``generate``, ``stream``:
what ``OnnxModel.generate_text`` and ``stream_text`` run) and an encoder's embeddings (``embed``).

An export of a Hugging Face model holds its base's tokenizer files; the reference model takes
ids (its vocabulary is its own). Chat prompts: ``runtime.chat``. numpy, tokenizers and the
standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from loraexport.artifact.schema import end_ids
from loraexport.core.untrusted import read_bounded, read_json, short_repr
from loraexport.errors import first_line
from loraexport.runtime import chat
from loraexport.runtime.files import RuntimeInputError
from loraexport.runtime.sampling import Sampling

TOKENIZER_FILE = "tokenizer.json"
# The largest real tokenizer.json files are ~35 MB (Gemma's); larger is refused unread.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
REPLACEMENT = "\ufffd"  # what a decoder makes of the bytes of a character not yet complete
EMBED_BATCH = 32  # texts per forward pass of embed


class ExportTokenizer:
    """An export's tokenizer: ``tokenizer.json`` (at most ``MAX_TOKENIZER_BYTES``, no more tokens
    than the model's vocabulary), the special tokens and chat template of
    ``tokenizer_config.json``."""

    def __init__(self, directory: Path, vocab_size: int | None) -> None:
        path = directory / TOKENIZER_FILE
        if not os.path.lexists(path):
            raise RuntimeInputError(
                f"{directory} has no {TOKENIZER_FILE}: text needs the tokenizer an export of a Hugging "
                "Face model holds; give this one token ids (generate, forward)"
            )
        raw = read_bounded(path, RuntimeInputError, MAX_TOKENIZER_BYTES, "tokenizer file")
        try:
            self.tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise RuntimeInputError(
                f"{path}: not a tokenizer the tokenizers library reads ({first_line(e)})"
            ) from e
        # tokenizer.json may hold its maker's padding and truncation (all-MiniLM-L6-v2's: padded
        # and cut to 128 tokens), which transformers' tokenizer leaves aside too: a text's ids are
        # its own, callers pad with a mask, and a text too long is refused, not cut.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and size > vocab_size:
            raise RuntimeInputError(
                f"{path}: {size} tokens, more than the model's vocab_size {vocab_size} "
                "(another model's tokenizer?)"
            )
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path, RuntimeInputError) if os.path.lexists(config_path) else {}
        if not isinstance(config, dict):
            raise RuntimeInputError(f"{config_path}: not a JSON object")
        self.special = {k: _content(config[k]) for k in SPECIAL_TOKENS if _content(config.get(k)) is not None}
        self.chat_template = chat.find_template(directory, config)
        self.pad_id = self.tokenizer.token_to_id(self.special.get("pad_token", ""))

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """The ids of ``text``; ``special_tokens``: with those the tokenizer adds (a BOS, [CLS] … [SEP])."""
        return self.tokenizer.encode(text, add_special_tokens=special_tokens).ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens left out (as transformers' ``skip_special_tokens``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def chat(self, prompt: str | list[dict]) -> str:
        """``prompt`` (a user message, or messages) through the export's chat template."""
        if self.chat_template is None:
            raise RuntimeInputError(
                "this export has no chat template (chat_template.jinja, or chat_template in "
                "tokenizer_config.json): pass the prompt as text, with chat=False"
            )
        return chat.render(self.chat_template, chat.messages_of(prompt), self.special)


def _content(token: object) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an added token's ``content``."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


class TextStream:
    """The text of ids arriving one at a time, in pieces: ``push`` returns what the new id adds
    ("" while the text ends in an incomplete character), ``close`` the rest. A piece is the
    difference between the decode of every id so far and the text already given, so the pieces
    join into the decode of all the ids, for every decoder where the text of fewer ids begins
    the text of more (byte-level BPE, Metaspace, WordPiece). Decoding every id each time costs
    about 0.1 µs per id (0.4 ms at 4,000 ids, SmolLM2's tokenizer), against milliseconds a step."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.ids, self.sent = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent):
            return ""  # wait for the character's other bytes
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def close(self) -> str:
        text = self.decode(self.ids)
        piece = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece


def _prompt_ids(model, prompt, max_new_tokens: int, chat_prompt: bool) -> np.ndarray:
    """The prompt's ids (1, T), after checking every argument of a text call."""
    if not isinstance(chat_prompt, bool):
        raise RuntimeInputError(f"chat must be True or False, not {short_repr(chat_prompt)}")
    if (
        not isinstance(max_new_tokens, int | np.integer)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise RuntimeInputError(f"max_new_tokens must be an integer ≥ 1, not {short_repr(max_new_tokens)}")
    if chat_prompt:
        chat.messages_of(prompt)
    elif not isinstance(prompt, str):
        raise RuntimeInputError(
            f"prompt must be a string (or, with chat=True, a list of messages), not {short_repr(prompt)}"
        )
    if model.kind == "encoder":
        raise RuntimeInputError("an encoder model does not generate: embed(texts) gives its embeddings")
    tok = model.tokenizer
    ids = tok.encode(tok.chat(prompt), special_tokens=False) if chat_prompt else tok.encode(prompt)
    if not ids:
        raise RuntimeInputError(f"the prompt {short_repr(prompt)} makes no tokens")
    return np.array([ids], np.int64)


def _new_ids(columns: Iterator[np.ndarray], ends: set[int]) -> Iterator[int]:
    """The generated ids of a batch of one, up to its first end id (left out)."""
    for column in columns:
        token = int(column[0])
        if token in ends:
            return
        yield token


def _columns(model, prompt, max_new_tokens, sampling: Sampling, adapter, chat_prompt) -> Iterator[int]:
    ids = _prompt_ids(model, prompt, max_new_tokens, chat_prompt)
    columns = model.stream_ids(ids, np.ones_like(ids), max_new_tokens, adapter, sampling.picker())
    return _new_ids(columns, set(end_ids(model.meta["model"])))


def generate(model, prompt, max_new_tokens: int, sampling: Sampling, adapter, chat_prompt: bool) -> str:
    """``OnnxModel.generate_text``: the decode of the new ids up to the first end id."""
    return model.tokenizer.decode(_columns(model, prompt, max_new_tokens, sampling, adapter, chat_prompt))


def stream(
    model, prompt, max_new_tokens: int, sampling: Sampling, adapter, chat_prompt: bool
) -> Iterator[str]:
    """``OnnxModel.stream_text``: ``generate``'s text in pieces (``TextStream``); every argument
    is checked here, before the first piece is asked for."""
    new = _columns(model, prompt, max_new_tokens, sampling, adapter, chat_prompt)
    return _pieces(new, TextStream(model.tokenizer.decode))


def _pieces(new: Iterator[int], text: TextStream) -> Iterator[str]:
    for token in new:
        if piece := text.push(token):
            yield piece
    if rest := text.close():
        yield rest


def embed(model, texts: list[str], normalize: bool, adapter) -> np.ndarray:
    """``OnnxModel.embed``: the mean of each text's last hidden states over its tokens (N, H),
    float32, of length 1 when ``normalize``."""
    output = model.meta["model"].get("output", "last_hidden_state")
    if model.kind != "encoder" or output != "last_hidden_state":
        raise RuntimeInputError(
            f"embed needs an encoder whose output is last_hidden_state; this export is a {model.kind} "
            f"model{f' with {output}' if model.kind == 'encoder' else ''}"
        )
    if not isinstance(texts, list | tuple) or not texts or not all(isinstance(t, str) for t in texts):
        raise RuntimeInputError(f"texts must be a non-empty list of strings, not {short_repr(texts)}")
    if not isinstance(normalize, bool):
        raise RuntimeInputError(f"normalize must be True or False, not {short_repr(normalize)}")
    tok = model.tokenizer
    rows = [tok.encode(t) for t in texts]
    context = model.meta["model"].get("context_length")
    for i, row in enumerate(rows):
        if not row or (isinstance(context, int) and len(row) > context):
            raise RuntimeInputError(f"texts[{i}] makes {len(row)} tokens; the model takes 1 to {context}")
    pad = model.tokens.get("pad") if model.tokens.get("pad") is not None else (tok.pad_id or 0)
    pooled = []
    for start in range(0, len(rows), EMBED_BATCH):
        batch = rows[start : start + EMBED_BATCH]
        ids = np.full((len(batch), max(map(len, batch))), pad, np.int64)  # (B, T), right-padded
        mask = np.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        hidden = model.forward(ids, mask, adapter=adapter)  # (B, T, H)
        summed = (hidden * mask[:, :, None]).sum(axis=1)  # (B, H): padding left out
        pooled.append(summed / mask.sum(axis=1, keepdims=True))
    out = np.concatenate(pooled).astype(np.float32)  # (N, H)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
