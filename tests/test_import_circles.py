"""No import circle runs through the cache, the data statistics, alignment, the permutation spec or the contract:
`contract/api.py` once named `PermutationSpec` from `fusion/alignment.py`, which imported the data statistics, which
import the contract. Every import counts as an arrow, also one inside a function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mergebench_core


def _core_imports() -> dict[str, set[str]]:
    """{module: core modules it imports}."""
    root = Path(mergebench_core.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[module] |= {n for n in names if n in modules and n != module}
    return graph


def _circle(graph: dict[str, set[str]], start: str) -> list[str]:
    """A shortest import path from `start` back to itself, or [] when there is none."""
    parents: dict[str, str] = {}
    todo = [start]
    while todo:
        here = todo.pop(0)
        for nxt in sorted(graph[here]):
            if nxt == start:
                path = [here]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if nxt not in parents:
                parents[nxt] = here
                todo.append(nxt)
    return []


@pytest.mark.parametrize("module", ["cache", "locks", "contract.api", "contract.permutations", "data.statistics",
                                    "fusion.alignment", "engine.roles", "training.methods"])
def test_the_cache_and_its_clients_are_in_no_import_circle(module):
    circle = _circle(_core_imports(), f"mergebench_core.{module}")
    assert not circle, " -> ".join(circle)
