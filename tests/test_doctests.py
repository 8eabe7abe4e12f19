"""Every docstring example in the library runs (``doctest`` over each ``src/der`` module that has one)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import der


def _modules() -> list[str]:
    return sorted(["der", *(i.name for i in pkgutil.walk_packages(der.__path__, "der."))])


def _with_examples() -> list[str]:
    out = []
    finder = doctest.DocTestFinder()
    for name in _modules():
        try:
            mod = importlib.import_module(name)
        except ImportError:  # an optional extra is missing: its examples cannot run here
            continue
        if any(t.examples for t in finder.find(mod, name)):
            out.append(name)
    return out


MODULES = _with_examples()


def test_doctests_are_collected() -> None:
    assert {"der.functional", "der._io", "der.geometry.entropynet"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    mod = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    res = doctest.testmod(mod, optionflags=flags, verbose=False, report=True)
    assert res.failed == 0, f"{res.failed} of {res.attempted} doctest examples failed in {name}"
