"""The tokenizer of a Hugging Face model directory, loaded once and checked against the model.

Refused: files over ``MAX_TOKENIZER_BYTES``, a ``tokenizer_config.json`` with values of the
wrong type, a ``tokenizer_class`` that is no tokenizer, a tokenizer transformers cannot load,
and one with more tokens than the model's embedding table (another model's tokenizer: its ids
would fail mid-verification).
"""

from __future__ import annotations

from pathlib import Path

from loraexport.core.untrusted import read_json, short_repr
from loraexport.errors import ModelFormatError
from loraexport.models.checks import check_tokenizer_config
from loraexport.models.hf.common import quiet_transformers, read_config, reason

TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
)
# A tokenizer file (tokenizer.json, vocab, merges, sentencepiece model) larger than this is not
# read: the largest real ones are ~35 MB (Gemma's tokenizer.json), and transformers holds a
# parsed copy several times the file's size.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024


def model_tokenizer(directory: Path):
    """The family's ``tokenizer``: that of ``directory``, checked against its config's vocab_size."""
    _, config = read_config(directory)
    return load_tokenizer(directory, config.get_text_config(decoder=True).vocab_size)


def load_tokenizer(directory: Path, vocab_size: int):
    """The tokenizer of a model directory, checked, or None when it has no
    ``tokenizer_config.json`` (generation prompts are then random token ids)."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    raw = read_json(path, ModelFormatError)
    check_tokenizer_config(raw, path)
    model_config = read_json(directory / "config.json", ModelFormatError)
    for where, cfg in ((path, raw), (directory / "config.json", model_config)):
        if isinstance(cfg, dict) and cfg.get("tokenizer_class") is not None:
            _check_tokenizer_class(cfg["tokenizer_class"], where)
    for name in TOKENIZER_FILES[1:]:
        f = directory / name
        if f.is_file() and f.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelFormatError(
                f"{f}: {f.stat().st_size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} loraexport reads "
                "for a tokenizer file"
            )
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False
            )
            if len(tok) > vocab_size:  # some text would get an id past the embedding table
                raise ModelFormatError(
                    f"the tokenizer has {len(tok)} tokens, more than the model's vocab_size {vocab_size}"
                )
            encode(tok, DEFAULT_PROMPTS, vocab_size)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from e
    # The tokenizers library raises plain Exception for a malformed tokenizer.json, and
    # transformers' tokenizer classes whatever their __init__ hits (AttributeError, TypeError,
    # RecursionError...): any failure to load the files is the files' fault.
    except Exception as e:
        raise ModelFormatError(f"{path}: transformers cannot load the tokenizer: {reason(e)}") from e
    return tok


def _check_tokenizer_class(name: str, where: Path) -> None:
    """AutoTokenizer instantiates whatever class of transformers ``tokenizer_class`` names (in
    ``tokenizer_config.json``, else ``config.json``): a model class there builds that model
    with its default config (billions of parameters), ``AutoTokenizer`` recurses. Only
    subclasses of ``PreTrainedTokenizerBase`` pass; a name transformers does not know falls
    back to the generic fast tokenizer, as transformers does."""
    from transformers import PreTrainedTokenizerBase
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        cls = tokenizer_class_from_name(name)
    except Exception as e:  # a lazy import of the module that defines it failed
        raise ModelFormatError(
            f"{where}: tokenizer_class {short_repr(name)} cannot be loaded: {reason(e)}"
        ) from e
    if cls is not None and (
        not isinstance(cls, type)
        or not issubclass(cls, PreTrainedTokenizerBase)
        or cls is PreTrainedTokenizerBase
    ):
        raise ModelFormatError(f"{where}: tokenizer_class {short_repr(name)} is not a tokenizer class")


def encode(tok, texts: list[str] | tuple[str, ...], vocab_size: int) -> list[list[int]]:
    """Token ids of each text; every id must index the model's embedding table."""
    seqs = []
    for text in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < vocab_size)]
        if bad:
            raise ModelFormatError(
                f"the tokenizer gives token id {short_repr(bad[0])} for {short_repr(text)}, outside "
                f"the model's vocab_size {vocab_size}"
            )
        seqs.append(ids)
    return seqs
