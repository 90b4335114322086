"""The import structure of the repository's Python files.

Three rules (docs/DESIGN.md, "Modules and imports"):

- The graph of imports between the project's own modules, at module level and inside functions,
  has no cycle. A cycle makes the result of an import depend on which module came first, and a
  partly initialized module fails late. (`if TYPE_CHECKING:` imports never run and do not count.)
- Imports sit at the top of a module. At most MAX_LOCAL_IMPORTS stay inside functions, each with
  a comment (same line or the line above) saying why: an optional heavy dependency or a module
  that only a GPU can use, imported only on the path that needs it.
- `python train.py --check` and config validation stay fast: the modules they load never import
  torch (its import alone takes seconds).

Every Python file of the repository counts: product modules, scripts and tests; tracked ones and new
ones that git does not ignore (what the next commit holds).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LOCAL_IMPORTS = 10

# Modules that `train.py --check` and config validation load: none of them may import torch.
TORCH_FREE = ("config", "guidance.registry", "model_files", "preflight", "train")


def _module_name(path: str) -> str:
    """`render/raster.py` -> `render.raster`; `render/__init__.py` -> `render`."""
    parts = list(Path(path).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def _sources() -> dict[str, tuple[str, str, ast.Module]]:
    """Module name -> (path, source text, syntax tree) for every Python file of the repository."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    out = {}
    for path in sorted({p for p in listed.split("\0") if p}):
        file = ROOT / path
        if not file.is_file():      # deleted in the working tree, not yet in the index
            continue
        text = file.read_text(encoding="utf-8")
        out[_module_name(path)] = (path, text, ast.parse(text, filename=path))
    return out


def _is_package(name: str, modules) -> bool:
    return modules[name][0].endswith("__init__.py")


def _imported_names(node: ast.Import | ast.ImportFrom, importer: str, modules) -> list[str]:
    """The dotted module names an import statement asks for (not yet filtered to ours)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:      # relative: resolve against the importer's package
        package = importer.split(".") if _is_package(importer, modules) else importer.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    # `from a.b import c` imports a.b, and a.b.c too when c is a submodule.
    return [base] + [f"{base}.{alias.name}" if base else alias.name
                     for alias in node.names if alias.name != "*"]


def _targets(node, importer: str, modules) -> set[str]:
    """Our modules whose code an import statement runs, or may run: the named module and the
    packages above it (their __init__), except the importer's own packages, already running."""
    own_packages = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 1)}
    if _is_package(importer, modules):
        own_packages.add(importer)
    out = set()
    for name in _imported_names(node, importer, modules):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in own_packages and prefix != importer:
                out.add(prefix)
    return out


def _functions_imports(tree: ast.Module):
    """Import statements inside a function body at any depth (`from __future__` excluded)."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if (in_function and isinstance(child, (ast.Import, ast.ImportFrom))
                    and not (isinstance(child, ast.ImportFrom) and child.module == "__future__")):
                found.append(child)
            visit(child, inside)

    visit(tree, False)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`, whose body never runs."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.Module):
    """Every import statement that can run: at module level and in functions, not under
    `if TYPE_CHECKING:` (its `else:` branch runs and counts)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
        todo.extend(children)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _sources()
    return {name: set().union(*(_targets(n, name, modules) for n in _runtime_imports(tree)))
            for name, (_, _, tree) in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Iterative depth-first search."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if color[child] == GREY:
                    path = [n for n, _ in stack]
                    return path[path.index(child):] + [child]
                if color[child] == WHITE:
                    color[child] = GREY
                    stack.append((child, iter(sorted(graph[child]))))
                    break
            else:
                color[node] = BLACK
                stack.pop()
    return None


def _comment(lines: list[str], lineno: int) -> str:
    """The why-comment of the import at 1-based `lineno`: on its line, or the comment lines
    directly above it."""
    same = lines[lineno - 1]
    if "#" in same and same.split("#", 1)[1].strip():
        return same.split("#", 1)[1].strip()
    above = []
    for line in reversed(lines[:lineno - 1]):
        if not line.strip().startswith("#"):
            break
        above.insert(0, line.strip().lstrip("#").strip())
    return " ".join(filter(None, above))


def _local_imports() -> list[tuple[str, int, str]]:
    """(path, line, comment) for every import inside a function."""
    out = []
    for path, text, tree in _sources().values():
        lines = text.splitlines()
        out += [(path, n.lineno, _comment(lines, n.lineno)) for n in _functions_imports(tree)]
    return sorted(out)


def test_graph_sees_the_known_edges():
    """The graph builder resolves our own imports (a guard against a vacuous pass)."""
    graph = _import_graph()
    assert "config" in graph["train"]
    assert "render.mesh" in graph["preflight"]
    assert all(t in graph for targets in graph.values() for t in targets)
    assert sum(map(len, graph.values())) > 100


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (directly or around a
    loop), found by removing each found cycle's first edge and searching again."""
    graph = {k: set(v) for k, v in graph.items()}
    cycles: list[list[str]] = []
    while (cycle := _find_cycle(graph)) is not None and len(cycles) < 20:
        cycles.append(cycle)
        graph[cycle[0]].discard(cycle[1])
    return cycles


def test_no_import_cycle():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles (each line: a imports b imports ... a):\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_few_imports_inside_functions_each_with_its_reason():
    found = _local_imports()
    listing = "\n".join(f"  {path}:{line}  # {why or '(no comment)'}" for path, line, why in found)
    assert len(found) <= MAX_LOCAL_IMPORTS, (
        f"{len(found)} imports inside functions (at most {MAX_LOCAL_IMPORTS}; move them to the "
        f"module top, or an optional dependency into a module-level try/except):\n{listing}")
    missing = [f"{path}:{line}" for path, line, why in found if not why]
    assert not missing, ("imports inside functions without a comment saying why: "
                         + ", ".join(missing))


@pytest.mark.parametrize("module", TORCH_FREE)
def test_check_path_modules_do_not_import_torch(module):
    if module not in _sources():
        pytest.skip(f"{module}.py is not in the repository")
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}, sys; print('torch' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"`import {module}` imports torch"
