"""The public API: every name in every public module's ``__all__`` is what it claims, in any import order.

A fresh interpreter per order (names first then every submodule, and every submodule first then names)
reads ``__all__`` dynamically, so names other modules add are covered too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# public names that are modules on purpose
MODULE_NAMES = {("der", "functional"), ("der.geometry", "data")}

_PROBE = r"""
import importlib, json, pkgutil, sys, types
import der

def public_modules():
    names = ["der"]
    for info in pkgutil.walk_packages(der.__path__, "der."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)

def kinds(mods):
    out = {}
    for name in mods:
        m = importlib.import_module(name)
        for attr in getattr(m, "__all__", []):
            v = getattr(m, attr)
            out[f"{name}:{attr}"] = "module:" + v.__name__ if isinstance(v, types.ModuleType) else type(v).__name__
    return out

mods = public_modules()
order = sys.argv[1]
seen = []
if order == "names_first":
    seen.append(kinds([m for m in mods if m.count(".") <= 1 and importlib.util.find_spec(m).submodule_search_locations]))
for m in mods:
    importlib.import_module(m)
seen.append(kinds(mods))
seen.append(kinds(mods))  # twice
print(json.dumps({"mods": mods, "seen": seen, "all": {m: "__all__" in vars(importlib.import_module(m)) for m in mods}}))
"""


def _probe(order: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PROBE, order], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict[str, dict]:
    return {order: _probe(order) for order in ("names_first", "modules_first")}


def test_every_public_name_is_what_it_claims_in_both_orders(probes) -> None:
    runs = [k for p in probes.values() for k in p["seen"]]
    final = runs[-1]
    assert final, "no public names found"
    for key, kind in final.items():
        got = {r[key] for r in runs if key in r}
        assert got == {kind}, f"{key} changes with the import order: {sorted(got)}"
        mod, name = key.split(":")
        if kind.startswith("module:"):
            assert (mod, name) in MODULE_NAMES, f"{key} is the module {kind[7:]}, not the object it names"


def test_geometry_functions_stay_functions_after_submodule_import() -> None:
    import importlib

    import numpy as np

    import der.geometry as G

    importlib.import_module("der.geometry.delaunay")
    importlib.import_module("der.geometry.maxima")
    from der.geometry import delaunay, maxima

    P = np.random.default_rng(0).random((30, 2))
    for _ in range(2):
        assert callable(G.delaunay) and callable(delaunay) and callable(G.maxima) and callable(maxima)
        assert G.delaunay(P).shape[1] == 3 and len(G.maxima(P)) >= 1
    assert importlib.import_module("der.geometry.delaunay").delaunay is G.delaunay


def test_packages_declare_all(probes) -> None:
    flags = probes["modules_first"]["all"]
    missing = [m for m, ok in flags.items() if not ok and (m.count(".") == 0 or m in PACKAGES)]
    assert not missing, f"packages without __all__: {missing}"


PACKAGES = {"der", "der.functional", "der.geometry", "der.truth", "der.attention", "der.data", "der.theory"}
