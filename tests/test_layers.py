"""No import runs up the layers: the buses deliver to a protocol (``bus.model.Delivery``) that
the hub satisfies, and never import the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pushd.bus


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_bus_module_imports_the_gateway() -> None:
    modules = sorted(Path(pushd.bus.__file__).parent.glob("*.py"))
    assert len(modules) > 3
    for path in modules:
        upward = {name for name in imported(path) if name.startswith("pushd.gateway")}
        assert not upward, (path.name, upward)
