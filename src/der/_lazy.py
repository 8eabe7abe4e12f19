"""Lazy attribute loading for package ``__init__`` files (keeps ``import der`` light)."""

from __future__ import annotations

import importlib
from typing import Any


def lazy_getattr(package: str, table: dict[str, str]):
    """Return a module ``__getattr__`` that imports ``table[name]`` (a submodule path) on first use."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
