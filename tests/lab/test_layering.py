"""The library never imports the lab: no ``import der_lab`` / ``from der_lab`` anywhere under src/der."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "der"


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))
    return names


def test_library_does_not_import_der_lab():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"expected the library sources under {SRC}, found {len(files)} files"
    bad = [f"{f.relative_to(SRC.parent)}: {m}" for f in files for m in _imported_modules(ast.parse(f.read_text()))
           if m == "der_lab" or m.startswith("der_lab.")]
    assert not bad, "src/der imports der_lab:\n" + "\n".join(bad)


def test_checker_sees_the_import_forms():
    code = "import der_lab.x\nfrom der_lab import y\nimportlib.import_module('der_lab.z')\nfrom . import w\n"
    assert _imported_modules(ast.parse(code)) == ["der_lab.x", "der_lab", "der_lab.z"]
