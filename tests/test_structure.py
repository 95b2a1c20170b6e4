"""The package's structure, read from its source: no import circle (function-level imports counted), no private
name imported from another subpackage, and the layering of DESIGN.md (nothing imports the applications)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_kdx"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("monai_kdx")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("monai_kdx"):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                is_module = submodule in modules
                found.append((submodule, "", node.lineno) if is_module else (target, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name and not name.startswith(target + "."):  # a module may read its own package
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_import_graph_has_no_circle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_crosses_a_subpackage_border():
    modules = _modules()
    crossing = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, modules):
            private = imported.startswith("_") or any(part.startswith("_") and part != "__init__" for part in
                                                      target.split(".")[1:])  # fmt: skip
            if private and _subpackage(target) != _subpackage(name):
                crossing.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} {imported}".strip())
    assert crossing == []


def test_only_the_command_line_imports_the_applications():
    graph = _graph()
    users = sorted(name for name, targets in graph.items() if any(_subpackage(t) == "monai_kdx.apps" for t in targets))
    assert [user for user in users if _subpackage(user) != "monai_kdx.apps"] == ["monai_kdx.cli"]
