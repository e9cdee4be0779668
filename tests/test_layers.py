"""Imports run down the layers: ``pushd.metrics`` is a leaf (prometheus only) that the gateway
and the bus may both import; the scrape-time collectors, which read every part of a node, live in
``pushd.collectors``, which only the daemon imports; the buses deliver to a protocol
(``bus.model.Delivery``) that the hub satisfies, and never import the gateway."""

from __future__ import annotations

import ast
from pathlib import Path

import pushd

ROOT = Path(pushd.__file__).parent


def pushd_imports(path: Path) -> set[str]:
    """The ``pushd.*`` modules a source file imports (at any depth of its body)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pushd":
                found.update(f"pushd.{alias.name}" for alias in node.names)
            elif node.module.startswith("pushd."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pushd."))
    return found


def test_metrics_is_a_leaf() -> None:
    assert pushd_imports(ROOT / "metrics.py") == set()


def test_only_the_daemon_imports_the_collectors() -> None:
    importers = {
        str(path.relative_to(ROOT.parent))
        for path in ROOT.rglob("*.py")
        if "pushd.collectors" in pushd_imports(path)
    }
    assert importers == {"pushd/daemon.py"}


def test_no_bus_module_imports_the_gateway() -> None:
    modules = sorted((ROOT / "bus").glob("*.py"))
    assert len(modules) > 3
    for path in modules:
        upward = {name for name in pushd_imports(path) if name.startswith("pushd.gateway")}
        assert not upward, (path.name, upward)
