"""The exception tree of ``pushd.errors``: every exception pushd defines is a ``PushdError``,
and the tree drawn in that module's docstring names each of them."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pushd
from pushd import errors


def pushd_exceptions() -> set[type[BaseException]]:
    """Every exception class defined in a module of the ``pushd`` package."""
    found: set[type[BaseException]] = set()
    for info in pkgutil.walk_packages(pushd.__path__, "pushd."):
        if info.name == "pushd.__main__":
            continue  # runs the CLI when imported
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, BaseException)
                and value.__module__.startswith("pushd.")
            ):
                found.add(value)
    return found


def test_every_pushd_exception_is_in_the_tree() -> None:
    outside = sorted(
        e.__qualname__ for e in pushd_exceptions() if not issubclass(e, errors.PushdError)
    )
    assert outside == []


def test_every_pushd_exception_is_defined_in_errors_and_drawn_in_its_docstring() -> None:
    drawn = set(re.findall(r"[├└]── (\w+)", errors.__doc__ or ""))
    defined = {e.__qualname__ for e in pushd_exceptions()}
    assert {e.__module__ for e in pushd_exceptions()} == {"pushd.errors"}
    assert drawn == defined - {"PushdError"}
