"""Imports go one way: the layer contracts in pyproject.toml hold, and no two modules import each other,
directly or through others, deferred imports inside functions included."""

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (an import cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def import_graph() -> dict[str, set[str]]:
    graph = grimp.build_graph("simsearch")  # every import statement, those inside functions included
    # a package's __init__ re-exports its modules: the package itself is not a layer of its own here
    return {module: {m for m in graph.find_modules_directly_imported_by(module) if m != "simsearch"}
            for module in graph.modules}


def test_no_import_cycle_between_modules_deferred_imports_included():
    graph = import_graph()
    packages = {m for m in graph if (ROOT / m.replace(".", "/") / "__init__.py").is_file()}
    # a package importing its own modules (re-exports) is not a cycle; a module importing its package's
    # __init__ to reach a sibling would be one, so only that direction is left out
    edges = {m: {i for i in imported if not (m in packages and i.startswith(m + "."))} for m, imported in graph.items()}
    assert strongly_connected(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    assert [m for m, imported in graph.items() if "simsearch.cli" in imported and m not in ("simsearch.__main__",)] == []


def test_layer_contracts_hold():
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout
