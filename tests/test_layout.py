"""The package's layout holds: dependencies point down, losses are pure, one registry.

Read statically (every import statement, the ones inside functions too), so a lazy import cannot
hide a cycle."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "polmctl"


def _unit(module: str) -> str:
    """polmctl.methods.dpo -> polmctl.methods; polmctl.entry -> polmctl.entry."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module unit -> {(imported polmctl module, importing file)}."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    names = [".".join(base + ([node.module] if node.module else []))]
                else:
                    names = [node.module or ""]
                if names == ["polmctl"]:
                    names = [f"polmctl.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("polmctl."):
                    edges[_unit(module)].add((name, str(path.relative_to(PACKAGE.parent))))
    return edges


EDGES = _imports()


def _depends(unit: str) -> set[str]:
    return {_unit(name) for name, _ in EDGES.get(unit, ())} - {unit}


def test_losses_import_nothing_of_polmctl_but_their_own_constants():
    for name, where in EDGES["polmctl.losses"]:
        assert name == "polmctl.losses", f"{where} imports {name}: losses are pure functions of tensors"


def test_no_two_packages_import_each_other_even_through_others():
    graph = {unit: _depends(unit) for unit in EDGES}
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            unit, path = stack.pop()
            for nxt in graph.get(unit, ()):
                if nxt == start:
                    cycles.append(" -> ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not cycles, cycles[:5]


@pytest.mark.parametrize(
    "low,high",
    [
        ("polmctl.rollout", "polmctl.methods"),  # sampling and scoring know no method
        ("polmctl.engine", "polmctl.methods"),  # the engine knows no method by name
        ("polmctl.engine", "polmctl.compress"),  # pruning masks reach it through after_step hooks
        ("polmctl.models", "polmctl.methods"),
        ("polmctl.data", "polmctl.methods"),
        ("polmctl.config", "polmctl.methods"),
        ("polmctl.methods", "polmctl.runners"),
    ],
)
def test_dependencies_point_down(low, high):
    assert high not in _depends(low), sorted(w for n, w in EDGES[low] if _unit(n) == high)


def test_one_registry_names_every_method_of_every_recipe():
    import re

    from polmctl.methods.registry import METHODS
    from polmctl.runners import RUNNERS

    recipes = sorted((PACKAGE / "conf" / "recipe").glob("*.yaml"))
    named = {re.search(r"override /method: (\w+)", p.read_text()).group(1) for p in recipes}
    assert named <= set(METHODS)
    for name, spec in METHODS.items():
        assert spec.runner in RUNNERS, name
        assert spec.schema().name == name  # the schema's name default is its registry key
        assert (spec.objective is not None) == (spec.runner == "train"), name


def test_one_ignore_index():
    defined = [
        str(p.relative_to(PACKAGE.parent))
        for p in PACKAGE.rglob("*.py")
        if any(line.startswith("IGNORE_INDEX =") for line in p.read_text().splitlines())
    ]
    assert defined == ["polmctl/losses/__init__.py"]


def test_every_test_module_names_its_tier():
    tests = Path(__file__).resolve().parent
    tiers = ("unit", "config", "recipes", "cli")
    for path in sorted(tests.rglob("test_*.py")):
        text = path.read_text()
        assert (
            any(f"pytest.mark.{t}" in text.split("pytestmark =", 1)[-1][:200] for t in tiers) and "pytestmark =" in text
        ), f"{path}: no pytestmark tier"
