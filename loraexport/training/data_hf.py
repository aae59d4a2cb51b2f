"""Training data for Hugging Face bases: JSON Lines, checked and tokenized before any training.

Decoders (GPT-2, Llama, Mistral, Qwen2): every line ``{"prompt": str, "completion": str}`` (the
loss is on the completion's tokens only) or every line ``{"text": str}`` (on every token), not
both kinds in one file. Sequence classifiers (BERT, RoBERTa with a head): ``{"text": str,
"label": int}`` with the label in ``[0, num_labels)``. Other keys of a line are ignored.

Tokenized with the base's own tokenizer: a prompt or a text with the special tokens the
tokenizer adds (Llama's BOS, BERT's [CLS] ... [SEP]), a completion without, the prompt and the
completion apart (as at generation time: the prompt's ids, then the generated ones). A decoder's
example ends with the tokenizer's EOS token, so the model learns to stop. An example longer than
``max_length`` tokens is refused, never cut (a cut completion would teach the model to stop
mid-answer, a cut text to end where the text does not); with ``pack``, ``{"text"}`` examples are
joined end to end instead and cut into rows of ``max_length`` tokens.

Every problem is a ``DataFormatError`` naming the file and the line.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraexport.core.io import require_file
from loraexport.core.untrusted import read_json_lines, short_repr
from loraexport.errors import DataFormatError

CAUSAL, CLASSIFY = "causal", "classify"  # what is trained: next tokens, or one label per text
PROMPT, TEXT, LABELLED = "prompt-completion", "text", "text-label"  # the formats of a line
SHAPES = {
    PROMPT: '{"prompt": str, "completion": str}',
    TEXT: '{"text": str}',
    LABELLED: '{"text": str, "label": int}',
}
_FIELDS = {PROMPT: ("prompt", "completion"), TEXT: ("text",), LABELLED: ("text", "label")}


@dataclass(frozen=True)
class Record:
    """One line of a data file, its fields checked (types, label range), not yet tokenized."""

    line: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One row the model trains on."""

    line: int  # the line of its file (packed rows: the line where the row starts)
    ids: tuple[int, ...]
    prompt: int = 0  # decoders: ids[:prompt] is the prompt (no loss on it)
    label: int | None = None  # classifiers: the class


def read_records(path: str | Path, task: str, num_labels: int | None = None) -> tuple[str, list[Record]]:
    """``(format, records)`` of a JSON Lines file for ``task``; each line bounded and checked
    (``untrusted.read_json_lines``), then its format, fields and label."""
    p = require_file(path, "data file")
    fmt, first, records = None, 0, []
    for n, obj in read_json_lines(p, DataFormatError):
        where = f"{p}:{n}"
        if not isinstance(obj, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {short_repr(obj)}")
        kind = _format(obj, task, where)
        if fmt is None:
            fmt, first = kind, n
        elif kind != fmt:
            raise DataFormatError(
                f"{where}: a {SHAPES[kind]} example in a file of {SHAPES[fmt]} examples (line {first}); "
                "use one format per file"
            )
        _check_fields(obj, kind, where, num_labels)
        records.append(Record(n, {k: obj[k] for k in _FIELDS[kind]}))
    if fmt is None:
        raise DataFormatError(f"{p}: no examples (the file is empty)")
    return fmt, records


def _format(obj: dict, task: str, where: str) -> str:
    if task == CLASSIFY:
        return LABELLED
    prompt, text = "prompt" in obj or "completion" in obj, "text" in obj
    if prompt and text:
        raise DataFormatError(
            f'{where}: holds both "text" and "prompt"/"completion"; a line is one or the other'
        )
    if not prompt and not text:
        raise DataFormatError(
            f"{where}: expected {SHAPES[PROMPT]} or {SHAPES[TEXT]}, got keys {short_repr(sorted(obj))}"
        )
    return PROMPT if prompt else TEXT


def _check_fields(obj: dict, fmt: str, where: str, num_labels: int | None) -> None:
    for key in _FIELDS[fmt]:
        if key not in obj:
            raise DataFormatError(f'{where}: missing "{key}" (expected {SHAPES[fmt]})')
        value, want = obj[key], int if key == "label" else str
        if not isinstance(value, want) or isinstance(value, bool):
            what = "an integer" if want is int else "a string"
            raise DataFormatError(f'{where}: "{key}" must be {what}, got {short_repr(value)}')
    label = obj.get("label") if fmt == LABELLED else None
    if label is not None and num_labels is not None and not 0 <= label < num_labels:
        raise DataFormatError(
            f"{where}: label {short_repr(label)} is outside [0, {num_labels}) "
            f"(the base's classification head has {num_labels} labels)"
        )


def split(
    records: list[Record], examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``examples`` (one per record, in order) split for held-out evaluation, deterministically,
    as ``data.split`` splits pairs: texts (prompts) held out never appear in training."""
    if not 0 < fraction < 1:
        raise DataFormatError(f"eval fraction must be in (0, 1), got {fraction}")
    keys = [r.fields.get("prompt", r.fields.get("text", "")) for r in records]
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    held = set(unique[: max(1, int(len(unique) * fraction))])
    train = [e for e, k in zip(examples, keys, strict=True) if k not in held]
    if not train:
        raise DataFormatError("data set too small to hold out an evaluation split; give --eval-data")
    return train, [e for e, k in zip(examples, keys, strict=True) if k in held]


def tokenize(
    path: str | Path,
    fmt: str,
    records: list[Record],
    tokenizer,
    *,
    max_length: int,
    limit: str,
    eos: int | None = None,
    pack: bool = False,
) -> list[Example]:
    """One example per record (read from ``path``), as token ids; ``eos`` ends a decoder's
    examples. An example that gives no tokens, or more than ``max_length`` (``limit`` says
    where that number comes from; not with ``pack``: see ``pack``), is refused naming its line."""
    if fmt == PROMPT:
        prompts = _ids(tokenizer, [r.fields["prompt"] for r in records], special=True)
        completions = _ids(tokenizer, [r.fields["completion"] for r in records], special=False)
        out = []
        for r, p, c in zip(records, prompts, completions, strict=True):
            if not p:
                raise DataFormatError(
                    f"{path}:{r.line}: the prompt gives no tokens (the completion would follow nothing)"
                )
            if not c:
                raise DataFormatError(f"{path}:{r.line}: the completion gives no tokens")
            out.append(Example(r.line, (*p, *c, eos), prompt=len(p)))
    else:
        texts = [r.fields["text"] for r in records]
        full = _ids(tokenizer, texts, special=True)
        out = []
        for r, own, ids in zip(records, _ids(tokenizer, texts, special=False), full, strict=True):
            if not own:
                raise DataFormatError(f"{path}:{r.line}: the text gives no tokens")
            if fmt == TEXT and ids[-1] != eos:  # some tokenizers add the EOS themselves
                ids = [*ids, eos]
            out.append(Example(r.line, tuple(ids), label=r.fields.get("label")))
    for e in out if not pack else ():
        if len(e.ids) > max_length:
            hint = ", or use --pack" if fmt == TEXT else ""
            raise DataFormatError(
                f"{path}:{e.line}: {len(e.ids)} tokens, longer than {limit}; shorten the example{hint} "
                "(loraexport refuses long examples rather than cut them)"
            )
    return out


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """``TEXT`` examples end to end (each ends with EOS), cut into rows of ``max_length``
    tokens (a row's tokens attend to the earlier examples in it, as in Hugging Face's
    ``run_clm``); a last row of one token (nothing to predict) is dropped."""
    stream: list[int] = []
    starts: list[int] = []
    for e in examples:
        starts.append(len(stream))
        stream.extend(e.ids)
    rows = []
    for off in range(0, len(stream), max_length):
        chunk = stream[off : off + max_length]
        if len(chunk) >= 2:
            line = examples[bisect.bisect_right(starts, off) - 1].line
            rows.append(Example(line, tuple(chunk)))
    return rows
