"""The files an app reads beside the graph, proven: ``config.json``, ``generation_config.json``, the
tokenizer's files and ``genai_config.json`` are what exporting the base makes
(``stages.export.write_extras``), made again into a scratch folder and compared with the export's.

``loraexport.json``'s sha256 says such a file did not change since it was listed; this says it is
the base's: an edited end token, rope base or head count, or two ids swapped in ``tokenizer.json``
fail here (onnxruntime-genai and ``loraexport.runtime`` act on them; parity does not read them).
A JSON file is compared by value (a base saved again by another version formats it otherwise),
any other byte for byte."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loraexport.errors import ModelFormatError
from loraexport.export import genai
from loraexport.models.registry import detect_family
from loraexport.stages.export import write_extras
from loraexport.verify.proof import FileProof

EXTRAS = "config and tokenizer files"  # the FileProof's name in the report
MAX_JSON_COMPARED = 64 * 2**20  # bytes of one JSON file compared by value (a large tokenizer.json: ~10 MB)


def prove_extras(base: Path, onnx_dir: Path, meta: dict) -> FileProof:
    """The extras of ``onnx_dir`` against those ``base`` makes with ``meta``'s description (whose
    ``model`` and ``graphs`` the proof holds to the reference): each missing, unclaimed or
    different file a failure naming it."""
    fp = FileProof(EXTRAS)
    family = detect_family(base)
    scratch = Path(tempfile.mkdtemp(prefix="loraexport-extras-"))
    try:
        try:
            write_extras(family, base, scratch, {"model": meta["model"], "graphs": meta.get("graphs") or {}})
        except ModelFormatError as e:
            fp.fail(f"the base's files cannot be made again: {e}")
            return fp
        for name in sorted({*family.extra_files, genai.GENAI_CONFIG}):
            want, got = scratch / name, onnx_dir / name
            if not want.is_file():
                if got.exists() or got.is_symlink():
                    fp.fail(f"{name} is unclaimed: exporting the base makes no such file")
            elif not got.is_file() or got.is_symlink():
                fp.fail(f"{name} is missing: exporting the base makes one")
            elif not _same(want, got):
                fp.fail(f"{name} is not the one exporting the base makes")
            else:
                fp.bytes += got.stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return fp


def _same(want: Path, got: Path) -> bool:
    if want.stat().st_size == got.stat().st_size and want.read_bytes() == got.read_bytes():
        return True
    if want.suffix != ".json" or max(want.stat().st_size, got.stat().st_size) > MAX_JSON_COMPARED:
        return False
    from loraexport.core.untrusted import read_json

    try:
        return read_json(want, ModelFormatError, MAX_JSON_COMPARED) == read_json(
            got, ModelFormatError, MAX_JSON_COMPARED
        )
    except ModelFormatError:
        return False
