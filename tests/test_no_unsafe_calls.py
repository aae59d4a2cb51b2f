"""No code path in the package can run code from a downloaded file (README: "Nothing loads pickle
unless asked"; issue 7).

An AST scan of every module in ``loraexport/`` refuses: ``torch.load`` without a literal
``weights_only=True``; ``pickle``/``dill``/``joblib`` loading; ``numpy.load`` with
``allow_pickle=True``; the ``eval``/``exec`` builtins; and ``trust_remote_code`` set to anything
but a literal ``False``. Names are resolved through imports and aliases (``import torch as t``,
``from pickle import loads``), so a rename does not hide a call. The checker is tested on planted
snippets first: a scan that could not fail would prove nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loraexport"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle"}
PICKLE_FUNCS = {"load", "loads", "Unpickler"}
BUILTINS = {"eval", "exec"}


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.aliases: dict[str, str] = {}  # local name -> qualified name ("t" -> "torch")
        self.findings: list[str] = []
        self.approved_torch_loads = 0

    def _flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(f"{self.filename}:{node.lineno}: {what}")

    # ---- imports: remember what each local name stands for ---------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def _qualname(self, func: ast.expr) -> str | None:
        """What a called name stands for: ``torch.load`` for ``torch.load``, for ``t.load`` after
        ``import torch as t``, and for ``load`` after ``from torch import load``."""
        if isinstance(func, ast.Name):
            return self.aliases.get(func.id, func.id)
        if isinstance(func, ast.Attribute):
            base = self._qualname(func.value)
            return f"{base}.{func.attr}" if base else None
        return None

    # ---- calls -------------------------------------------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualname(node.func) or ""
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if name == "torch.load":
            if _is_const(kw.get("weights_only"), True):
                self.approved_torch_loads += 1
            else:
                self._flag(node, "torch.load without weights_only=True")
        head, _, last = name.rpartition(".")
        if head.split(".")[0] in PICKLE_MODULES and last in PICKLE_FUNCS:
            self._flag(node, f"{name} (unpickling runs code)")
        if name in ("numpy.load", "np.load") and not _is_const(
            kw.get("allow_pickle", ast.Constant(False)), False
        ):
            self._flag(node, "numpy.load with allow_pickle")
        if isinstance(node.func, ast.Name) and node.func.id in BUILTINS and node.func.id not in self.aliases:
            self._flag(node, f"{node.func.id}() builtin")
        if name in {f"builtins.{b}" for b in BUILTINS}:
            self._flag(node, f"{name}()")
        if "trust_remote_code" in kw and not _is_const(kw["trust_remote_code"], False):
            self._flag(node, "trust_remote_code not a literal False")
        self.generic_visit(node)  # visit_Dict covers f(**{"trust_remote_code": True})

    def visit_Dict(self, node: ast.Dict) -> None:
        self._check_dict(node)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:  # kwargs["trust_remote_code"] = True
        for t in node.targets:
            if isinstance(t, ast.Subscript) and _is_const(t.slice, "trust_remote_code"):
                if not _is_const(node.value, False):
                    self._flag(node, "trust_remote_code not a literal False")
        self.generic_visit(node)

    def _check_dict(self, node: ast.expr) -> None:
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if k is not None and _is_const(k, "trust_remote_code") and not _is_const(v, False):
                    self._flag(node, "trust_remote_code not a literal False")


def _is_const(node: ast.expr | None, value: object) -> bool:
    """``node`` is the literal ``value`` (``True`` is not ``1``)."""
    return isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value


def scan(source: str, filename: str = "<snippet>") -> _Scanner:
    scanner = _Scanner(filename)
    scanner.visit(ast.parse(source, filename))
    return scanner


# ---- the checker itself --------------------------------------------------------------------
@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('a.bin')",
        "import torch\ntorch.load('a.bin', weights_only=False)",
        "import torch\nflag = True\ntorch.load('a.bin', weights_only=flag)",
        "import torch as t\nt.load('a.bin')",
        "from torch import load\nload('a.bin')",
        "from torch import load as tl\ntl('a.bin', map_location='cpu')",
        "import pickle\npickle.load(open('f', 'rb'))",
        "import pickle\npickle.loads(b'')",
        "import pickle as pk\npk.Unpickler(f).load()",
        "from pickle import loads\nloads(b'')",
        "import _pickle\n_pickle.loads(b'')",
        "import dill\ndill.load(f)",
        "import joblib\njoblib.load('m.pkl')",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)",
        "eval('1 + 1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
        "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
        "def f(remote):\n    AutoModel.from_pretrained(p, trust_remote_code=remote)",
        "AutoModel.from_pretrained(p, **{'trust_remote_code': True})",
        "kwargs = {'local_files_only': True, 'trust_remote_code': True}",
        "kwargs['trust_remote_code'] = True",
    ],
)
def test_checker_flags_planted_unsafe_call(snippet):
    assert scan(snippet).findings, snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load('a.bin', map_location='cpu', weights_only=True)",
        "model.eval()",  # nn.Module.eval, not the builtin
        "import numpy as np\nnp.load('a.npy')",
        "AutoModel.from_pretrained(p, local_files_only=True, trust_remote_code=False)",
        "kwargs = {'trust_remote_code': False}",
        "import json\njson.loads('{}')",
        "from safetensors.torch import load_file\nload_file('a.safetensors')",
        "# torch.load('a.bin')\nx = 'pickle.loads(data)'",  # comments and strings are not calls
    ],
)
def test_checker_passes_safe_code(snippet):
    assert scan(snippet).findings == [], snippet


# ---- the package ----------------------------------------------------------------------------
def test_package_has_no_unsafe_calls():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, files  # the scan really covers the package
    findings, approved = [], 0
    for f in files:
        s = scan(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))
        findings += s.findings
        approved += s.approved_torch_loads
    assert findings == [], "\n".join(findings)
    assert approved >= 1  # the --allow-pickle path (weights_only=True) was seen and accepted
