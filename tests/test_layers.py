"""Imports point down (issue 15): cli -> tuning -> tracking (MLflow runs, model registry, reports) -> engine ->
methods -> models, data and metrics -> core (config, registry, errors, values, bundled files, recipes). A study
runs training trials and tracks them; tracking records what the engine runs (its callback is a loop callback), and
the engine is handed the tracker, never imports it. Read from the source with ``ast``, so an import inside a
function counts as much as one at the top of a module; and the modules' top-level imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raysemi"
#: Layer of each second-level name under ``raysemi``; any other name (config, registry, errors, ...) is core, 0.
LAYERS = {"cli": 6, "tuning": 5, "tracking": 4, "engine": 3, "methods": 2, "models": 1, "data": 1, "metrics": 1}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def _modules() -> dict[str, ast.Module]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        trees[name] = ast.parse(path.read_text())
    return trees


def _imports(nodes: list[ast.stmt] | ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(nodes) if isinstance(nodes, ast.Module) else nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("raysemi"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("raysemi")}
    return found


def test_imports_point_down() -> None:
    upward = {(name, target) for name, tree in _modules().items() for target in _imports(tree)
              if _layer(target) > _layer(name)}
    assert not upward, f"imports that point up: {sorted(upward)}"


def test_top_level_imports_form_no_cycle() -> None:
    trees = _modules()
    graph = {name: {t for t in _imports(list(tree.body)) if t in trees and t != name} for name, tree in trees.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, name, target])}"
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
