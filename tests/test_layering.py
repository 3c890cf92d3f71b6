"""The package reads one way: no import cycle, however a module is imported, and one list per registry.

An ``ast`` walk of ``src/ubsmoe`` collects every import of a package module, at module
level, inside functions and under ``if TYPE_CHECKING`` alike, and the graph must have no
cycle. An import placed inside a function is allowed only where it defers a heavy optional
dependency (Flower, Ray, matplotlib, W&B); each such place is listed here with its reason,
so a new one is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ubsmoe"

# (importing module, imported module): why the import waits until the function runs
DEFERRED = {
    ("ubsmoe", "ubsmoe.export"): "`ubsmoe.load_exported` without importing torch on `import ubsmoe`",
    ("ubsmoe.runner", "ubsmoe.apps.flower_client"): "the ClientApp imports Flower (backend=flower only)",
    ("ubsmoe.fl.backends.flower", "ubsmoe.fl.backends.flower_codec"): "imports Flower",
    ("ubsmoe.fl.backends.flower", "ubsmoe.fl.backends.flower_inprocess"): "imports Flower",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported package module, inside a function) for every import statement of the module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, id(node) in local))
    return found


def _graph() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    deferred: set[tuple[str, str]] = set()
    for name, path in modules.items():
        for target, inside in _imports(name, path, modules):
            edges[name].add(target)
            if inside:
                deferred.add((name, target))
    return edges, deferred


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_function_local_and_type_only_imports() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_function_local_imports_only_defer_heavy_optional_dependencies() -> None:
    _, deferred = _graph()
    unexplained = sorted(deferred - set(DEFERRED))
    assert unexplained == [], f"imports inside functions that defer nothing heavy: {unexplained}"
    assert sorted(set(DEFERRED) - deferred) == [], "DEFERRED lists an import that is no longer deferred"


def test_the_cycle_check_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    ("registry", "listed"),
    [
        ("ubsmoe.fl.strategies:STRATEGIES", "METHODS"),
        ("ubsmoe.fl.backends:BACKENDS", "BACKENDS"),
        ("ubsmoe.fl.backends.flower:HOSTS", "FLOWER_MODES"),
        ("ubsmoe.fl.server_optim:SERVER_OPTIMIZERS", "SERVER_OPTIMIZERS"),
        ("ubsmoe.fl.aggregators:AGGREGATORS", "AGGREGATORS"),
        ("ubsmoe.fl.faults:POISONINGS", "BYZANTINE_MODES"),
        ("ubsmoe.fl.schedule:SCHEDULES", "SCHEDULES"),
        ("ubsmoe.backbones:ADAPTERS", "ADAPTERS"),
        ("ubsmoe.data.commonsense:BENCHMARKS", "BENCHMARKS"),
        ("ubsmoe.assembly:RUN_KINDS", "DATA_KINDS"),
    ],
)
def test_each_registry_has_exactly_the_listed_names(registry: str, listed: str) -> None:
    import importlib

    from ubsmoe import names

    module, attribute = registry.split(":")
    assert tuple(getattr(importlib.import_module(module), attribute)) == getattr(names, listed)
