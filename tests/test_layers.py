"""Imports run down the layers: ``pushd.metrics`` is a leaf (prometheus only) that the gateway
and the bus may both import; the scrape-time collectors, which read every part of a node, live in
``pushd.collectors``, which only the daemon imports; the buses deliver to a protocol
(``bus.model.Delivery``) that the hub satisfies, and never import the gateway; only the daemon
chooses the bus."""

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
            if node.module == "pushd" or node.module.startswith("pushd."):
                if node.module != "pushd":
                    found.add(node.module)
                # ``from pushd.bus import redis`` imports the module pushd.bus.redis
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
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


def test_only_the_composition_root_chooses_the_bus() -> None:
    """The memory-or-Redis choice is made by the daemon, once: it builds a backplane
    (``pushd.bus.backplane``), and the HTTP API, the gateway and the markets know that and the
    bus model, never which bus runs."""
    kinds = {"pushd.bus.memory", "pushd.bus.redis", "pushd.bus.control", "pushd.bus.lease"}
    for package in ("http", "gateway", "market", "feed"):
        for path in sorted((ROOT / package).glob("*.py")):
            assert not pushd_imports(path) & kinds, (path.name, pushd_imports(path) & kinds)
