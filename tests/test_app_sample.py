"""``samples/app/app.py`` serves one export with two adapters, the adapter chosen per request,
in a process where torch and transformers cannot be imported: through ``loraexport.runtime``
and through onnxruntime-genai, each answer is PEFT's greedy text for that adapter (issue 26).
The export is made by the real CLI (``--mode adapter``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from app_example import APP, PROMPT, REPO, make_example, peft_greedy, run_without_torch

pytestmark = pytest.mark.slow
NEW_TOKENS = 16
ADAPTERS = ("adapter-a", "adapter-b")
# `python app.py ARGS`, in the child: sys.argv is ["-c", app.py, ARGS...]
RUN_APP = "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the --mode adapter export, {adapter: PEFT's greedy text})."""
    tmp = make_example(tmp_path_factory.mktemp("app"))
    adapters = [arg for name in ADAPTERS for arg in ("--adapter", str(tmp / name))]
    cmd = [sys.executable, "-m", "loraexport.cli", "export", "--model", str(tmp / "base"), *adapters]
    r = subprocess.run(
        [*cmd, "--mode", "adapter", "--out", str(tmp / "served")], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-2000:]
    want = {name: peft_greedy(tmp / "base", tmp / name, PROMPT, NEW_TOKENS)[1] for name in ADAPTERS}
    assert want["adapter-a"] != want["adapter-b"]  # the adapters tell apart
    return tmp / "served", want


@pytest.mark.parametrize("client", ["runtime", "genai"])
def test_the_app_answers_each_request_with_its_adapters_peft_text(served, client):
    export, want = served
    order = ["adapter-a", "adapter-b", "adapter-a"]  # switched per request
    requests = "".join(json.dumps({"prompt": PROMPT, "adapter": a}) + "\n" for a in order)
    args = [str(APP), str(export), "--client", client, "--max-new-tokens", str(NEW_TOKENS)]
    r = run_without_torch(RUN_APP, *args, stdin=requests)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert answers == [{"adapter": a, "text": want[a]} for a in order]


def test_a_request_the_export_cannot_serve_gets_an_error_line(served):
    export, want = served
    requests = (
        json.dumps({"prompt": PROMPT, "adapter": "nope"})
        + "\n"
        + json.dumps({"prompt": PROMPT, "adapter": "adapter-b"})
        + "\n"
    )
    r = run_without_torch(RUN_APP, str(APP), str(export), "--max-new-tokens", str(NEW_TOKENS), stdin=requests)
    assert r.returncode == 0, r.stderr[-3000:]
    bad, good = (json.loads(line) for line in r.stdout.splitlines())
    assert "nope" in bad["error"] and good == {"adapter": "adapter-b", "text": want["adapter-b"]}
