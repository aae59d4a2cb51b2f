"""docs/runtime.md's blocks, run in order on a fresh copy of the repository: the example is
made and exported, and each client's block (``loraexport.runtime``, onnxruntime-genai, plain
onnxruntime, the app sample) prints PEFT's greedy text for adapter-a (issue 26: "each way has
a runnable snippet that a test executes"). ``make test-docs`` runs them too, in README's order.

Optimum's block needs transformers 4.x (optimum-onnx 0.1.0), which ``.venv`` does not have:
``make test-optimum`` makes ``.venv-optimum`` and runs the test marked ``optimum``, which runs
that block with its python (``LORAEXPORT_OPTIMUM_PYTHON``), and the encoder test beside it
(``ORTModelForFeatureExtraction``); ``make test`` deselects both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_example import PROMPT, peft_greedy
from doc_blocks import NESTED, REPO, Block, blocks_of, environment, run_block, tracked_files

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="run by a documentation block"),
]
DOC = REPO / "docs" / "runtime.md"
NEW_TOKENS = 24  # what the blocks ask for
BLOCK_TIMEOUT = 300  # seconds
OPTIMUM = "make test-optimum"  # the target that alone runs Optimum's block
OPTIMUM_VENV_PYTHON = REPO / ".venv-optimum" / "bin" / "python"  # the Makefile's OPTIMUM_VENV
# absolute, not resolved: the venv's python is a link, and the venv is where the link lies
OPTIMUM_PYTHON = Path(os.environ.get("LORAEXPORT_OPTIMUM_PYTHON", OPTIMUM_VENV_PYTHON)).absolute()


def _copy(dest: Path) -> Path:
    for f in tracked_files(REPO):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        (dest / f).write_bytes((REPO / f).read_bytes())
    return dest


def _clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the repository, and the shell of a reader with ``.venv`` activated."""
    root = _copy(tmp_path / "clone")
    env = environment(root)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python, loraexport
    return root, env


def _run(block: Block, root: Path, env: dict[str, str]) -> list[str]:
    ran = run_block(block, root, env, BLOCK_TIMEOUT)
    assert ran.returncode == 0, f"{block.where}:\n{block.text}--- output\n{ran.output[-3000:]}"
    return ran.output.splitlines()


def test_every_client_block_prints_peft_s_greedy_text(tmp_path):
    root, env = _clone(tmp_path)
    outputs = {}
    for block in blocks_of(DOC):
        if block.kind in ("sh", "python") and block.target is None:
            outputs[block.where] = _run(block, root, env)
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


def _optimum_python() -> Path:
    if not OPTIMUM_PYTHON.is_file():
        pytest.fail(
            f"no {OPTIMUM_PYTHON}: Optimum runs in an environment of its own (transformers 4.x); "
            f"`{OPTIMUM}` makes .venv-optimum, then runs this test"
        )
    return OPTIMUM_PYTHON


@pytest.mark.optimum
def test_optimum_block_prints_peft_s_greedy_text(tmp_path):
    """The example made and exported by the page's first block in ``.venv``, then Optimum's block
    as written, with ``.venv-optimum``'s python first on PATH."""
    python = _optimum_python()
    blocks = blocks_of(DOC)
    optimum = [b for b in blocks if b.target == OPTIMUM]
    assert [b.kind for b in optimum] == ["python"], f"one Optimum block marked <!-- {OPTIMUM} --> in {DOC}"
    assert "make_example.py" in blocks[0].text, f"{blocks[0].where}: the example comes first"
    root, env = _clone(tmp_path)
    _run(blocks[0], root, env)
    side = env | {"PATH": f"{python.parent}{os.pathsep}{env['PATH']}"}
    printed = _run(optimum[0], root, side)
    example = root / "runs" / "example"
    _, want = peft_greedy(example / "base", example / "adapter-a", PROMPT, NEW_TOKENS)
    assert printed == [want]


# Mean-pooled last hidden states of a width-32 encoder, float32 onnxruntime against float32 torch:
# a few roundings in sums of 32 products (test_runtime_text.py's embeddings measured 1e-7).
POOLED_ATOL = 1e-5
IDS = [[1, 5, 17, 42, 9, 2], [1, 33, 2, 0, 0, 0]]  # two rows, the second padded
MASK = [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
POOL_WITH_OPTIMUM = """
import json, sys
import torch
from optimum.onnxruntime import ORTModelForFeatureExtraction

model = ORTModelForFeatureExtraction.from_pretrained(sys.argv[1])
ids, mask = (torch.tensor(json.loads(a)) for a in sys.argv[2:])
hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, H)
m = mask[:, :, None].float()
print(json.dumps(((hidden * m).sum(1) / m.sum(1)).tolist()))  # (N, H)
"""


def _pooled(model) -> np.ndarray:
    import torch

    mask = torch.tensor(MASK)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(IDS), attention_mask=mask).last_hidden_state  # (N, T, H)
    m = mask[:, :, None].float()
    return ((hidden * m).sum(1) / m.sum(1)).numpy()  # (N, H)


@pytest.mark.optimum
def test_optimum_feature_extraction_is_the_mean_pooled_peft_encoder(tmp_path):
    """A tiny BERT with a PEFT adapter on query and value, exported merged, read by Optimum's
    ``ORTModelForFeatureExtraction``: its mean-pooled hidden states are PEFT's, not the base's."""
    from hf_tiny import save_base_and_adapter
    from peft import PeftModel
    from transformers import AutoModel

    from loraexport.stages.export import export

    python = _optimum_python()
    base, adapter = save_base_and_adapter("bert", tmp_path)
    export(base, tmp_path / "onnx", adapter=adapter)
    args = [str(tmp_path / "onnx"), json.dumps(IDS), json.dumps(MASK)]
    ran = subprocess.run(
        [python, "-c", POOL_WITH_OPTIMUM, *args], capture_output=True, text=True, timeout=BLOCK_TIMEOUT
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    got = np.array(json.loads(ran.stdout), np.float32)
    want = _pooled(PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).eval())
    assert got.shape == want.shape == (len(IDS), 32)
    np.testing.assert_allclose(got, want, atol=POOLED_ATOL)
    assert np.abs(got - _pooled(AutoModel.from_pretrained(base).eval())).max() > 100 * POOLED_ATOL
