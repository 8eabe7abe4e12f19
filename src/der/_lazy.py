"""Lazy attribute loading for package ``__init__`` files (keeps ``import der`` light).

A lazily exported name may equal the name of the submodule that defines it (``der.geometry.delaunay``
is a function in ``der/geometry/delaunay.py``). Importing the submodule would normally rebind the package
attribute to the module; the package's class is switched to :class:`LazyPackage`, which binds the
exported object instead, so ``from der.geometry import delaunay`` is the function in every import order.
The submodule itself stays reachable with ``importlib.import_module("der.geometry.delaunay")`` and
``from der.geometry.delaunay import ...``.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = ["LazyPackage", "lazy_getattr"]


class LazyPackage(types.ModuleType):
    """A package module whose lazily exported names are never shadowed by same-named submodules."""

    def __setattr__(self, name: str, value: Any) -> None:
        table = self.__dict__.get("_lazy_table", {})
        if (
            name in table
            and isinstance(value, types.ModuleType)
            and value.__name__ == f"{self.__name__}.{name}"
            and name in vars(value)
        ):
            value = vars(value)[name]  # the exported object, not the submodule of the same name
        super().__setattr__(name, value)


def lazy_getattr(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that imports ``table[name]`` (a submodule path) on first use, and
    make ``package`` a :class:`LazyPackage` for ``table``."""
    mod = sys.modules[package]
    mod.__dict__["_lazy_table"] = dict(table)
    if type(mod) is types.ModuleType:
        mod.__class__ = LazyPackage

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(mod, name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
