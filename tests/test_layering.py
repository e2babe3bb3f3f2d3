"""The architecture rules that keep ggufrun fast to start and easy to reuse as a library."""

from __future__ import annotations

import ast
import functools
import pkgutil
import subprocess
import sys
from pathlib import Path

import ggufrun

CORE = sorted(
    m.name for m in pkgutil.walk_packages(ggufrun.__path__, "ggufrun.")
    if not m.name.startswith("ggufrun.cli")
)
HEAVY = ("llama_cpp", "pandas", "numpy", "modelscope", "huggingface_hub", "matplotlib", "gguf", "rich")


def test_core_never_imports_click_or_rich() -> None:
    code = (
        "import sys; sys.modules['click'] = None; sys.modules['rich'] = None\n"
        f"import importlib\nfor m in {CORE!r}: importlib.import_module(m)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\nfrom ggufrun.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", f"heavy modules imported by --help: {proc.stdout}"


def test_only_the_llama_package_imports_llama_cpp() -> None:
    root = Path(ggufrun.__file__).parent
    importers = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if "import llama_cpp" in p.read_text() or "from llama_cpp" in p.read_text()
    ]
    assert importers and all(p.startswith("llama/") for p in importers), importers


# ---- the import graph ------------------------------------------------------------------------------

# Every `import` and `from ... import` of a ggufrun module counts as an edge, wherever it sits: at
# module level, inside a function, or under `if TYPE_CHECKING:`. A function-level import only delays
# a circle to run time (and hides it from the reader), and a TYPE_CHECKING import is still a
# dependency of the code's meaning, so neither may be used to break one.
API_MODULES = {"anthropic", "llamacpp", "ollama", "openai", "responses", "seed"}


@functools.cache
def parse(path: Path) -> ast.Module:
    """``path``'s syntax tree, parsed once for all the tests here (~0.5 s a pass over the package)."""
    return ast.parse(path.read_text(), str(path))


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """ggufrun's modules -> the ggufrun modules each imports (``from pkg import mod`` names mod)."""
    root = Path(ggufrun.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        modules[".".join(parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(parse(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                # `from pkg import mod` depends on mod; on pkg itself only for the names that are not modules
                targets = submodules + ([target] if len(submodules) < len(node.names) else [])
            for target in targets:
                while target and target not in modules:  # `import ggufrun.x.y` names ggufrun.x.y's module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return {name: frozenset(targets) for name, targets in graph.items()}


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    found = cycles(import_graph())
    assert found == [], "modules in one import circle: " + "; ".join(" ".join(c) for c in found)


def test_api_modules_never_import_each_other() -> None:
    # server/ reads top-down: app.py -> one module per API -> the shared core. An API that imports
    # another, or a shared module that imports an API, ties their changes together again.
    graph = import_graph()
    apis = {f"ggufrun.server.{m}" for m in API_MODULES}
    assert apis <= set(graph), apis - set(graph)
    crossing = sorted((a, b) for a in graph if a != "ggufrun.server.app" for b in graph[a] if b in apis)
    assert crossing == [], crossing


def test_no_private_name_crosses_a_module() -> None:
    """``from ggufrun.x import _y`` or ``x._y`` outside x: a private name is x's to change, so a
    module that needs it needs a public one (a private module, e.g. llama/_lib.py, may be imported).
    Static, so it sees names reached through a module, not through an object (``server._engine``)."""
    root = Path(ggufrun.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts) for p in root.rglob("*.py")}
    found = []
    for path in root.rglob("*.py"):
        here = path.relative_to(root.parent)
        package = ".".join(here.parent.parts)
        aliases = set()  # names bound to a ggufrun module here
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ggufrun")):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module or "") if p)
                for a in node.names:
                    if f"{target}.{a.name}" in modules:
                        aliases.add(a.asname or a.name)
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{here}:{node.lineno} imports {a.name} from {target}")
            elif isinstance(node, ast.Import):
                aliases.update(a.asname for a in node.names if a.asname and a.name.startswith("ggufrun"))
        for node in ast.walk(parse(path)):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{here}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert found == [], "\n".join(found)
