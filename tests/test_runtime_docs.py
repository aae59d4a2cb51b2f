"""docs/runtime.md's blocks, run in order on a fresh copy of the repository: the example is
made and exported, and each client's block (``loraexport.runtime``, onnxruntime-genai, plain
onnxruntime, the app sample) prints PEFT's greedy text for adapter-a (issue 26: "each way has
a runnable snippet that a test executes"). ``make test-docs`` runs them too, in README's order."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from app_example import PROMPT, peft_greedy
from doc_blocks import NESTED, REPO, blocks_of, environment, run_block, tracked_files

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="run by a documentation block"),
]
DOC = REPO / "docs" / "runtime.md"
NEW_TOKENS = 24  # what the blocks ask for
BLOCK_TIMEOUT = 300  # seconds


def _copy(dest: Path) -> Path:
    for f in tracked_files(REPO):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).write_bytes((REPO / f).read_bytes())
    return dest


def test_every_client_block_prints_peft_s_greedy_text(tmp_path):
    root = _copy(tmp_path / "clone")
    env = environment(root)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, loraexport
    outputs = {}
    for block in blocks_of(DOC):
        if block.kind not in ("sh", "python"):
            continue
        ran = run_block(block, root, env, BLOCK_TIMEOUT)
        assert ran.returncode == 0, f"{block.where}:\n{block.text}--- output\n{ran.output[-3000:]}"
        outputs[block.where] = ran.output.splitlines()
    example = root / "runs" / "example"
    _, want = peft_greedy(example / "base", example / "adapter-a", PROMPT, NEW_TOKENS)
    _, want_b = peft_greedy(example / "base", example / "adapter-b", PROMPT, NEW_TOKENS)
    printed = list(outputs.values())
    assert len(printed) == 5  # the example, runtime, the app, genai, plain onnxruntime
    runtime, app, genai, plain = printed[1:]
    assert runtime[0] == want and len(runtime) == 2 and runtime[1] != want  # greedy, then sampled
    assert [json.loads(line) for line in app] == [
        {"adapter": "adapter-a", "text": want},
        {"adapter": "adapter-b", "text": want_b},
    ]
    assert genai == [want] and plain == [want]
