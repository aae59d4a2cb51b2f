"""The CLI's and the outputs' contract stays put: every command's ``--help`` text and the keys
of ``report.json`` and ``loraexport.json`` are compared with the files in ``tests/golden/``.

A change to a flag, a help text or a JSON key fails here until the golden files are written
again on purpose: ``LORAEXPORT_WRITE_GOLDEN=1 pytest tests/cli/test_contract.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from clihelp import ok

from loraexport.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
WRITE = os.environ.get("LORAEXPORT_WRITE_GOLDEN") == "1"
COMMANDS = [
    "",
    "train",
    "merge",
    "export",
    "convert-adapter",
    "verify",
    "merge-and-export",
    "inspect",
    "analyze",
    "sweep",
]


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if WRITE:
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing: write it with LORAEXPORT_WRITE_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_texts_unchanged(command):
    r = CliRunner().invoke(main, [*command.split(), "--help"], terminal_width=100)
    ok(r)
    _check(f"help-{command or 'loraexport'}.txt", r.stdout)


def _keys(value, prefix: str = "") -> list[str]:
    """Every key path of a JSON value; list items collapse to ``[]``, file names to ``*``."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            key = "*" if prefix.endswith("files") else k
            out += [f"{prefix}.{key}", *_keys(v, f"{prefix}.{key}")]
        return sorted(set(out))
    if isinstance(value, list):
        return sorted({k for item in value for k in _keys(item, prefix + "[]")})
    return []


@pytest.mark.slow
def test_output_json_keys_unchanged(causal_base, causal_adapter, tmp_path):
    from loraexport.pipeline import merge_and_export

    out = tmp_path / "out"
    merge_and_export(
        causal_base,
        causal_adapter,
        out,
        samples=2,
        latency_points=((1, 4),),
        latency_budget_s=0.05,
    )
    keys = {
        name: _keys(json.loads((out / name).read_text(encoding="utf-8")))
        for name in ("report.json", "loraexport.json")
    }
    _check("json-keys.json", json.dumps(keys, indent=1) + "\n")


@pytest.mark.slow
def test_adapter_mode_json_keys_unchanged(seq2seq_base, seq2seq_adapter, tmp_path):
    """The keys an adapter-mode export adds (``lora_inputs``, ``adapter_files``; the report's
    ``adapter_mode``), on the encoder-decoder of the reference family."""
    from loraexport.pipeline import merge_and_export

    out = tmp_path / "out"
    merge_and_export(seq2seq_base, seq2seq_adapter, out, mode="adapter", samples=2)
    keys = {
        name: _keys(json.loads((out / name).read_text(encoding="utf-8")))
        for name in ("report.json", "loraexport.json")
    }
    _check("json-keys-adapter-mode.json", json.dumps(keys, indent=1) + "\n")
