"""The package's shape, read from its source with ``ast`` (every ``import``, including those
inside functions, which is where import circles hide):

- no import circle between loraexport's modules;
- no module imports the package root (``loraexport/__init__.py`` is the public API, not a
  shared namespace) or the CLI, except the CLI itself;
- click only under ``loraexport/cli/``; torch never in ``loraexport.runtime`` (apps ship it
  without torch) or in the modules it imports;
- no file over 400 lines, no CLI module over 250;
- floors: a package imports only the packages below it (``LAYERS``); at most 6 modules at the
  package root; the Hugging Face model types spelled in one module (``models.types``);
- no public function of ``stages/``, ``pipeline`` or ``cli/`` takes more than 8 parameters
  (options travel as ``spec.ExportSpec``, ``spec.Run``, ``VerifyOptions``, ``TrainOptions``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loraexport"
MAX_LINES = 400
MAX_CLI_LINES = 250
MAX_ROOT_MODULES = 6
MAX_PARAMETERS = 8  # of a public function in stages/, pipeline, cli/ (*args and **kwargs count one each)
# The floors, lowest first: a module may import its own package and those below it. errors and
# _version sit at the root (apps catch ``loraexport.errors``), beside core.
LAYERS = (
    ("errors", "_version", "core"),
    ("spec",),  # ExportSpec, Run: what an export is and how a command runs (no torch)
    ("artifact",),  # loraexport.json and the output folder: no torch
    ("runtime",),  # apps: onnxruntime + numpy only
    ("lora",),
    ("models",),
    ("export",),
    ("training",),
    ("verify",),
    ("report",),
    ("stages",),
    ("pipeline",),
    ("analyze",),
    ("cli",),
)
MODEL_TYPES = ('"llama"', '"mistral"', '"qwen2"', '"gpt2"', '"bert"', '"roberta"')


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The loraexport modules ``path`` imports (``from a import b`` counts as ``a.b`` when that
    is a module, else ``a``), and every other top-level package it imports (as ``pkg``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    internal, external = {}, {}
    for name, path in modules.items():
        imported = _imports(path, name, modules)
        internal[name] = {m for m in imported if m in modules and m != name}
        external[name] = {m.split(".")[0] for m in imported if not m.startswith("loraexport")}
    return internal, external


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _parents(module: str) -> set[str]:
    """A package's ``__init__`` runs when any module below it is imported: not an import edge
    a module chooses, so it is not counted."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circle():
    internal, _ = _graph()
    graph = {m: {i for i in deps if i not in _parents(m)} for m, deps in internal.items()}
    assert _cycles(graph) == []


def test_nothing_imports_the_package_root_or_the_cli():
    internal, _ = _graph()
    for module, deps in internal.items():
        if module == "loraexport":
            continue
        assert "loraexport" not in deps, f"{module} imports the package root"
        if not module.startswith("loraexport.cli"):
            assert not any(d.startswith("loraexport.cli") for d in deps), f"{module} imports the CLI"


def test_click_only_in_the_cli_and_no_torch_in_the_runtime():
    internal, external = _graph()
    for module, packages in external.items():
        if "click" in packages:
            assert module.startswith("loraexport.cli"), f"{module} imports click"
    reachable, todo = set(), ["loraexport.runtime"]
    while todo:
        m = todo.pop()
        if m not in reachable:
            reachable.add(m)
            todo.extend(internal[m])
    for module in reachable:
        assert "torch" not in external[module], f"loraexport.runtime reaches torch through {module}"


def test_files_stay_small():
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_CLI_LINES if name.startswith("loraexport.cli") else MAX_LINES
        assert lines <= limit, f"{path.relative_to(PACKAGE.parent)}: {lines} lines (at most {limit})"


def test_the_checker_sees_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: package {top!r} is on no floor of LAYERS")


def _back_arrows(internal: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} imports {d}"
        for m, deps in internal.items()
        if m != "loraexport"
        for d in deps
        if d != "loraexport" and d not in _parents(m) and _floor(d) > _floor(m)
    )


def test_no_back_arrows():
    internal, _ = _graph()
    assert _back_arrows(internal) == []


def test_the_checker_sees_a_planted_back_arrow():
    planted = {"loraexport.models.base": {"loraexport.export.onnx"}, "loraexport.export.onnx": set()}
    assert _back_arrows(planted) == ["loraexport.models.base imports loraexport.export.onnx"]


def test_few_modules_at_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_model_types_are_spelled_in_one_module():
    spelled = {
        name
        for name, path in _modules().items()
        if any(t in path.read_text(encoding="utf-8") for t in MODEL_TYPES)
    }
    assert spelled == {"loraexport.models.types"}, spelled


def _long_signatures(source: str, where: str) -> list[str]:
    out = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            if count > MAX_PARAMETERS:
                out.append(f"{where}.{node.name}: {count} parameters")
    return out


def test_no_public_function_of_the_upper_floors_takes_more_than_8_parameters():
    found = []
    for name, path in _modules().items():
        if name == "loraexport.pipeline" or name.startswith(("loraexport.stages.", "loraexport.cli.")):
            found += _long_signatures(path.read_text(encoding="utf-8"), name)
    assert found == []


def test_the_signature_checker_sees_a_planted_long_signature():
    planted = (
        "def run(a, b, c, d, e, f, g, *, h=1, **rest):\n    pass\n\n"
        "def _private(a, b, c, d, e, f, g, h, i):\n    pass\n"
    )
    assert _long_signatures(planted, "m") == ["m.run: 9 parameters"]


def _calls(source: str, name: str) -> int:
    """How many calls of ``name`` (a function or a class) ``source`` makes."""
    return sum(
        isinstance(n, ast.Call)
        and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)
        for n in ast.walk(ast.parse(source))
    )


def _places(name: str) -> dict[str, int]:
    counts = {m: _calls(p.read_text(encoding="utf-8"), name) for m, p in _modules().items()}
    return {m: c for m, c in counts.items() if c}


def test_one_flow_per_stage():
    """An export folder is written by one flow (``stages.export.write_export``, the only caller of
    ``write_output`` with a description) and every verification runs one flow
    (``stages.verify.verify_into``, the only place that sequences proof, parity, quality and
    latency): a residency or a mode is a ``Source`` or a reference, never an orchestrator of its own."""
    described = {
        m
        for m, p in _modules().items()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.Call)
        and getattr(n.func, "id", None) == "write_output"
        and any(k.arg == "meta" for k in n.keywords)
    }
    assert described == {"loraexport.stages.export"}, described
    assert set(_places("write_export")) == {"loraexport.stages.export", "loraexport.pipeline"}
    steps = {
        m
        for step in ("prove", "parity", "quality", "latency")
        for m in _places(step)
        if m.startswith("loraexport.stages")
    }
    assert steps == {"loraexport.stages.verify"}, steps


def test_the_flow_checker_counts_calls():
    assert _calls("x = f(1)\ny.f(2)\ng(f)\n", "f") == 2
