"""The package's layer order and its absence of import cycles, read from the source (ast).

A module may import its own layer or a lower one; a cycle is refused even inside one layer.
Imports inside functions count too: they are how cycles used to hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detox_lightning"

# Lowest first. Top-level modules are named by their module name, subpackages by their folder.
LAYERS = [
    {"errors", "moved", "trl_compat"},
    {"io"},
    {"offline"},
    {"rl"},
    {"models"},
    {"data"},
    {"rewards"},
    {"training"},
    {"evaluation"},
    {"bench"},
    {"cli", "export", "evaluate", "__init__", "__main__"},
]


def layer_of(module: str) -> int:
    """The layer of a dotted module name inside the package, e.g. detox_lightning.rl.kl -> rl's."""
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module}: its top-level name {key!r} is in no layer of tests/test_layers.py; add it")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module of the package that `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE.name:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles found by depth-first search (each reported once, from its smallest module)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target == node:
                continue
            if state.get(target) == "open":
                cycle = stack[stack.index(target):]
                i = cycle.index(min(cycle))
                cycle = cycle[i:] + cycle[:i]
                if cycle not in found:
                    found.append(cycle)
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    assert upward_imports(import_graph()) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    graph = {"detox_lightning.rl.kl": {"detox_lightning.training.module"}, "detox_lightning.training.module": {"detox_lightning.rl.kl"}}
    assert upward_imports(graph) == ["detox_lightning.rl.kl (layer 3) imports detox_lightning.training.module (layer 7)"]
    assert cycles(graph) == [["detox_lightning.rl.kl", "detox_lightning.training.module"]]


def test_imports_inside_functions_are_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from detox_lightning.evaluation import toxicity\n    import detox_lightning.rl\n")
    assert imports_of(source) == {"detox_lightning.evaluation.toxicity", "detox_lightning.rl"}


@pytest.mark.parametrize("name", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
def test_every_subpackage_has_a_layer(name):
    layer_of(f"{PACKAGE.name}.{name}")
