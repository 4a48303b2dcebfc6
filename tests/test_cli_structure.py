"""The command line's shape holds: its modules stay small, none of them (nor the mergeability plugin's) is part of an
import circle, lazy imports inside functions included, and the core names no plugin's command."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"mergebench_core": ROOT / "mergebench_core",
            "mergebench_mergeability": ROOT / "plugins" / "mergeability" / "mergebench_mergeability"}
CHECKED = ("mergebench_core.cli", "mergebench_core.contract.commands", "mergebench_core.contract.hookspecs",
           "mergebench_mergeability")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of PACKAGES it imports anywhere in its body (`from a import b` is an arrow to `a.b`
    when that is a module, else to `a`)."""
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        arrows = graph.setdefault(name, set())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base for a in node.names]
            arrows.update(t for t in targets if t in found and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circle_runs_through_the_command_line_or_the_mergeability_plugin():
    found = modules()
    assert "mergebench_core.cli.main" in found and "mergebench_mergeability.command" in found
    graph = import_graph(found)
    assert "mergebench_core.cli.plugin_commands" in graph["mergebench_core.cli.main"]
    involved = [c for c in circles(graph) if any(m.startswith(CHECKED) for m in c)]
    assert not involved, involved


@pytest.mark.parametrize("name", CHECKED)
def test_modules_stay_under_500_lines(name):
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items() if m.startswith(name)}
    assert sizes and max(sizes.values()) <= 500, sizes


def test_the_core_names_no_plugin_command():
    """No core module imports the mergeability plugin or spells its command's name as a value."""
    named = []
    for module, path in modules().items():
        if module.startswith("mergebench_core"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value == "mergeability":
                    named.append(module)
    graph = import_graph(modules())
    named += [m for m, arrows in graph.items() if m.startswith("mergebench_core")
              and any(a.startswith("mergebench_mergeability") for a in arrows)]
    assert not named
