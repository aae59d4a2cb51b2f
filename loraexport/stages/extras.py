"""What an export folder holds beside its graphs: the base's config and tokenizer files, and
onnxruntime-genai's ``genai_config.json`` (shared by the in-memory and the streamed export)."""

from __future__ import annotations

import shutil
from pathlib import Path

from loraexport.core.io import read_json, write_json
from loraexport.errors import ModelFormatError
from loraexport.export import genai
from loraexport.models.base import ModelFamily


def write_extras(family: ModelFamily, src: Path, dst: Path, description: dict) -> None:
    """What an app needs beside the graph: the base's config and tokenizer files (the tokenizer
    class under the name transformers 4.x, Optimum and onnxruntime-genai read), and for a
    decoder onnxruntime-genai runs, ``genai_config.json`` (``export.genai``)."""
    for name in family.extra_files:
        if not (src / name).is_file():
            continue
        if name == "tokenizer_config.json":  # checked when the base was loaded
            config = read_json(src / name, ModelFormatError)
            write_json(dst / name, genai.portable_tokenizer_config(config))
        else:
            shutil.copy2(src / name, dst / name)
    if genai.supported(description["model"]) and "model" in description["graphs"]:
        config = genai.genai_config(description["model"], description["graphs"]["model"])
        write_json(dst / genai.GENAI_CONFIG, config)
